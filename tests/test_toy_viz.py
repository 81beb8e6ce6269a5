import json

import torch

from ddpm_lib.paths import VP, LinearFlow
from ddpm_lib.sampling import sample_loop
from ddpm_lib.schedules import get_schedule
from ddpm_lib.solvers import DDIM
from ddpm_lib.toy import ExactDenoiser, GaussianFit, ring
from ddpm_lib.toy_viz import field_frame, field_viewer, pull, velocity

TOY, LINEAR = ring(), VP(get_schedule("linear", 1000))


def test_a_frame_has_a_panel_per_denoiser_and_changes_with_t():
    denoisers = {"exact": ExactDenoiser(TOY, LINEAR), "Gaussian fit": GaussianFit(TOY, LINEAR)}
    one = field_frame(TOY, {"exact": denoisers["exact"]}, {}, LINEAR.point(500))
    two = field_frame(TOY, denoisers, {"exact": torch.zeros(5, 2)}, LINEAR.point(500))
    assert one.dtype.name == two.dtype.name == "uint8"
    assert one.ndim == two.ndim == 3 and two.shape[0] == one.shape[0] and two.shape[1] > 1.8 * one.shape[1]
    assert (field_frame(TOY, denoisers, {}, LINEAR.point(10)) != field_frame(TOY, denoisers, {}, LINEAR.point(900))).any()


def test_the_viewer_scrubs_the_visited_steps_within_its_budget():
    exact = ExactDenoiser(TOY, LINEAR)
    x_T = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = list(sample_loop(exact, x_T.shape, DDIM(10), x_T=x_T))
    viewer = field_viewer(TOY, {"exact": exact}, {"exact": steps}, budget=300_000)
    assert (viewer.slider.min, viewer.slider.max) == (0, 9)  # DDIM-10's steps before the data
    assert viewer.static_ts == [0, 8, 9]  # noise, the step nearest each forming level (t = 199 and 99), the last
    viewer.slider.value = 5
    assert viewer.t == 5 and viewer.frame.ndim == 3
    assert len(json.dumps(viewer._repr_mimebundle_())) <= 300_000


def test_the_velocity_field_is_minus_the_linear_flows_ode_and_pull_is_sigma_squared_times_the_score():
    flow, x = LinearFlow(), torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = ExactDenoiser(TOY, flow)
    p, h = flow.point(0.6), 1e-6
    *_, last = DDIM()(exact, x, [p, flow.point(0.6 - h)], noise=None)  # one tiny Euler step toward the data
    moved = last.x_t
    assert torch.allclose(velocity(exact(x, p), x, p), (moved - x) / h, atol=1e-6)
    q = LINEAR.point(300)
    a = q.alpha**2
    assert torch.allclose(pull(exact(x, q), x, q), (1 - a) * TOY.score(x, a), atol=1e-12)
