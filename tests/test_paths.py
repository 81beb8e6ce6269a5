import itertools
import math

import numpy as np
import pytest
import torch

from ddpm_lib.checkpoint import load_model
from ddpm_lib.cli import main
from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.paths import PATHS, VP, GridPoint, LinearFlow, ddim_timesteps
from ddpm_lib.sampling import check_samples, sample, sample_loop
from ddpm_lib.schedules import get_schedule
from ddpm_lib.solvers import DDIM, SOLVERS, DPMSolverPP3M
from ddpm_lib.viz import trajectory_viewer

COSINE = VP(get_schedule("cosine", 1000))


def test_vp_points_are_the_schedules_square_roots_and_the_data_ends_it():
    schedule = COSINE.schedule
    for t in (0, 1, 500, 999):
        p = COSINE.point(t)
        assert p == GridPoint(t, math.sqrt(schedule.alpha_bar[t].item()), math.sqrt(1 - schedule.alpha_bar[t].item()))
        assert p.alpha**2 + p.sigma**2 == pytest.approx(1, abs=1e-15)
        assert p.lam == pytest.approx(0.5 * math.log(schedule.snr[t].item()), abs=1e-12)
    data = COSINE.point(-1)
    assert (data.alpha, data.sigma, data.lam) == (1.0, 0.0, math.inf)
    assert COSINE.point(999).alpha < 1e-4  # the cosine schedule's end: almost pure noise
    with pytest.raises(ValueError, match="from -1 .* to T-1=999, got 1000"):
        COSINE.point(1000)


def test_the_linear_flow_goes_from_pure_noise_to_the_data_in_a_straight_line():
    flow = LinearFlow()
    assert flow.point(1.0) == GridPoint(1000.0, 0.0, 1.0) and flow.point(1.0).lam == -math.inf
    assert flow.point(0.0) == GridPoint(0.0, 1.0, 0.0) and flow.point(0.0).lam == math.inf
    p = flow.point(0.25)
    assert (p.t, p.alpha, p.sigma) == (250.0, 0.75, 0.25) and p.lam == pytest.approx(math.log(3))
    assert flow.input_scale(p) == pytest.approx(1 / math.sqrt(0.75**2 + 0.25**2))
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\]"):
        flow.point(1.5)


@pytest.mark.parametrize("path", [COSINE, LinearFlow()], ids=lambda p: p.name)
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_a_grid_runs_from_its_noisiest_point_down_to_the_data(path, steps):
    grid = path.grid(steps)
    assert len(grid) == steps + 1
    assert grid[-1].sigma == 0 and grid[-1].alpha == 1
    lams = [p.lam for p in grid]
    assert all(a < b for a, b in zip(lams, lams[1:], strict=False))  # every step removes noise
    assert grid[0] == (path.point(999) if isinstance(path, VP) else path.point(1.0))


def test_ddim_timesteps_spacing():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and all(a - b == 20 for a, b in itertools.pairwise(ts))
    ts = ddim_timesteps(1000, 7)
    assert len(set(ts)) == 7 and ts[0] == 999 and ts == sorted(ts, reverse=True)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="between 1 and T=1000"):
            ddim_timesteps(1000, bad)


def test_the_vp_grid_is_the_trailing_one():
    assert [p.t for p in COSINE.grid(10)] == [*ddim_timesteps(1000, 10), -1]
    assert [p.t for p in COSINE.grid()] == [*range(999, -1, -1), -1]  # all T by default
    assert len(LinearFlow().grid()) == LinearFlow.default_steps + 1


@pytest.mark.parametrize("path", [COSINE, LinearFlow()], ids=lambda p: p.name)
def test_a_batch_of_points_broadcasts_and_matches_the_single_points(path):
    g = torch.Generator().manual_seed(0)
    times = path.training_times(6, g)
    batch = path.points(times, (6, 1, 4, 4))
    assert batch.alpha.shape == batch.sigma.shape == (6, 1, 1, 1) and batch.alpha.dtype == torch.float32
    for i, time in enumerate(times.tolist()):
        p = path.point(time)
        assert batch.alpha[i].item() == pytest.approx(p.alpha, rel=1e-6) and batch.sigma[i].item() == pytest.approx(p.sigma, rel=1e-6)
        assert batch.t[i].item() == pytest.approx(p.t)


def test_training_times_cover_each_paths_range():
    g = torch.Generator().manual_seed(1)
    vp_times = COSINE.training_times(20_000, g)
    assert vp_times.dtype == torch.long and vp_times.min() == 0 and vp_times.max() == 999
    s = LinearFlow().training_times(20_000, g)
    assert s.dtype == torch.float64 and 0 <= s.min() < 0.001 and 0.999 < s.max() < 1
    assert s.mean().item() == pytest.approx(0.5, abs=0.01)


def test_the_paths_are_listed_by_name():
    assert PATHS == {"vp": VP, "linear_flow": LinearFlow}


# --- A model of another path needs nothing outside paths.py and the parametrization table --------------------------


def test_a_linear_flow_checkpoint_records_its_path_and_samples_through_every_ode_solver(flow_checkpoint):
    model, diffusion = load_model(flow_checkpoint)
    assert (diffusion.path, diffusion.prediction) == ("linear_flow", "velocity")
    denoiser = guided(Denoiser.from_checkpoint(flow_checkpoint, clip=False))
    assert isinstance(denoiser.path, LinearFlow)
    x_T = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    finished = {}
    for name, cls in SOLVERS.items():
        if name == "ddpm":
            with pytest.raises(ValueError, match="ddpm's ancestral steps need the betas of the VP path; this model's path is linear_flow"):
                sample(denoiser, x_T.shape, cls(), x_T=x_T)
            continue
        steps = list(sample_loop(denoiser, x_T.shape, cls(steps=10), x_T=x_T))
        assert [s.index for s in steps] == list(range(11)) and steps[0].point == LinearFlow().point(1.0)
        assert steps[-1].point.sigma == 0 and steps[-1].t == 0.0
        finished[name] = check_samples(steps[-1].x_t)
    # the trained flow turns noise into bars: every ODE solver lands on nearly the same images from the same noise
    reference = sample(denoiser, x_T.shape, DPMSolverPP3M(50), x_T=x_T)
    for name, x in finished.items():
        assert (x - reference).abs().mean() < 0.1, name
    viewer = trajectory_viewer(list(sample_loop(denoiser, x_T.shape, DDIM(20), x_T=x_T)), nrow=4)
    assert (viewer.slider.min, viewer.slider.max) == (0, 20) and viewer.static_ts[0] == 0 and viewer.static_ts[-1] == 20
    viewer.slider.value = 7
    assert viewer.t == 7 and viewer.label(7).startswith("step 7, t = 650")


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp2m", "dpmpp3m"])
def test_the_cli_samples_a_linear_flow_checkpoint_and_writes_its_gif(flow_checkpoint, sampler, tmp_path, capsys):
    out, gif = tmp_path / "x.npy", tmp_path / "x.gif"
    options = ["--checkpoint", str(flow_checkpoint), "--num", "4", "--sampler", sampler, "--steps", "6"]
    assert main(["sample", *options, "--out", str(out)]) == 0 and np.load(out).shape == (4, 3, 8, 8)
    assert main(["gif", *options, "--out", str(gif)]) == 0 and gif.stat().st_size > 0
    if sampler == "ddim":  # without --sampler, a linear-flow checkpoint is sampled with its path's default, Euler's method
        plain = tmp_path / "plain.npy"
        assert main(["sample", "--checkpoint", str(flow_checkpoint), "--num", "4", "--steps", "6", "--out", str(plain)]) == 0
        assert np.array_equal(np.load(plain), np.load(out))
    capsys.readouterr()
    for command, says in (
        (["sample", "--sampler", "ddpm", "--out", str(out)], "need the betas of the VP path"),
        (["nll"], "a linear_flow model"),
    ):
        assert main([command[0], "--checkpoint", str(flow_checkpoint), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1


def test_the_linear_flows_time_densities_integrate_to_one_and_match_its_draws():
    s = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    draws = LinearFlow().training_times(200_000, torch.Generator().manual_seed(2), sampler="logit_normal")
    for sampler in ("uniform", "logit_normal"):
        assert torch.trapezoid(LinearFlow().time_density(s, sampler), s).item() == pytest.approx(1, abs=1e-3)
    counts = torch.histc(draws, bins=10, min=0, max=1) / len(draws)  # the share of draws in each tenth of [0, 1]
    edges = torch.linspace(1e-9, 1 - 1e-9, 11, dtype=torch.float64)
    tenths = [torch.linspace(a, b, 2001, dtype=torch.float64) for a, b in zip(edges, edges[1:], strict=False)]
    expected = torch.tensor([torch.trapezoid(LinearFlow().time_density(x, "logit_normal"), x) for x in tenths])
    torch.testing.assert_close(counts.double(), expected, atol=3e-3, rtol=0)
