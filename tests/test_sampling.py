import pytest
import torch

from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.diffusion import DiffusionConfig, q_posterior, q_sample
from ddpm_lib.paths import GridPoint
from ddpm_lib.sampling import (
    DegenerateModelError,
    SamplerStep,
    check_network,
    check_samples,
    check_trajectory,
    ddim_step,
    ddpm_step,
    sample,
    sample_loop,
)
from ddpm_lib.schedules import get_schedule
from ddpm_lib.solvers import DDIM, DDPM
from ddpm_lib.unet import UNet

SCHEDULE = get_schedule("linear", 1000)
SHAPE = (4, 1, 6, 6)


def data_and_noise():
    return torch.rand(SHAPE) * 2 - 1, torch.randn(SHAPE)


def test_ddpm_step_adds_no_noise_at_t0():
    x_t, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    a = ddpm_step(x_t, 0, eps, SCHEDULE, noise=torch.randn(SHAPE))
    b = ddpm_step(x_t, 0, eps, SCHEDULE, noise=torch.randn(SHAPE) * 100)
    assert torch.equal(a.x_prev, b.x_prev)
    torch.testing.assert_close(a.x_prev, a.x0)  # at t = 0 the posterior mean is the predicted x0


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_step_is_posterior_mean_plus_sigma_times_noise(variance):
    x0, eps = data_and_noise()
    t = 300
    x_t = q_sample(x0, t, SCHEDULE, eps)
    z = torch.randn(SHAPE)
    out = ddpm_step(x_t, t, eps, SCHEDULE, noise=z, variance=variance)
    mean, _ = q_posterior(x0, x_t, t, SCHEDULE)
    sigma2 = SCHEDULE.posterior_variance[t] if variance == "beta_tilde" else SCHEDULE.betas[t]
    torch.testing.assert_close(out.x_prev, mean + sigma2.sqrt().float() * z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0, 1, 50, 500, 999])
def test_oracle_eps_recovers_x0(t):
    x0, eps = data_and_noise()
    x_t = q_sample(x0, t, SCHEDULE, eps)
    out = ddpm_step(x_t, t, eps, SCHEDULE, clip_x0=False)
    torch.testing.assert_close(out.x0, x0, atol=1e-4, rtol=0)
    if t == 0:
        torch.testing.assert_close(out.x_prev, x0, atol=1e-6, rtol=0)
    # a deterministic DDIM step with the true eps lands exactly on q_sample at t_prev with that eps
    t_prev = t // 2 - 1
    ddim = ddim_step(x_t, t, t_prev, eps, SCHEDULE, eta=0.0, clip_x0=False)
    expected = x0 if t_prev == -1 else q_sample(x0, t_prev, SCHEDULE, eps)
    torch.testing.assert_close(ddim.x_prev, expected, atol=1e-4, rtol=0)


def test_ddim_with_eta_1_and_every_step_is_the_ddpm_step():
    x0, eps = data_and_noise()
    t = 400
    x_t = q_sample(x0, t, SCHEDULE, eps)
    z, eps_hat = torch.randn(SHAPE), eps + 0.1 * torch.randn(SHAPE)  # an imperfect model
    ddpm = ddpm_step(x_t, t, eps_hat, SCHEDULE, noise=z, variance="beta_tilde", clip_x0=False)
    ddim = ddim_step(x_t, t, t - 1, eps_hat, SCHEDULE, eta=1.0, noise=z, clip_x0=False)
    torch.testing.assert_close(ddim.x_prev, ddpm.x_prev, atol=1e-5, rtol=1e-5)


@pytest.fixture
def model(tiny_config):
    m = UNet(tiny_config)
    for p in m.parameters():  # give the zero-initialised layers weights, so the output depends on the input
        torch.nn.init.normal_(p, std=0.1)
    return m


SMALL = get_schedule("linear", 20)


def clipped(model, **settings):
    """The model as a sampler sees it: a denoiser on the T = 20 linear schedule (SMALL), x0 clipped."""
    return guided(Denoiser(model, DiffusionConfig(T=20), **settings))


def test_sample_loop_yields_every_step_then_the_sample(model):
    steps = list(sample_loop(clipped(model), (2, 1, 8, 8), DDPM(), generator=torch.Generator().manual_seed(0)))
    assert [s.t for s in steps] == list(range(19, -1, -1)) + [-1]
    assert all(isinstance(s, SamplerStep) and s.x_t.shape == s.x0.shape == (2, 1, 8, 8) for s in steps)
    assert torch.equal(steps[-1].x_t, steps[-1].x0)
    ddim = list(sample_loop(clipped(model), (2, 1, 8, 8), DDIM(5)))
    assert [s.t for s in ddim] == [19, 15, 11, 7, 3, -1]


@pytest.mark.parametrize("solver", [DDPM(), DDIM(10, eta=1.0)], ids=["ddpm", "ddim"])
def test_same_seed_same_images_different_seed_different_images(model, solver):
    def run(seed):
        return sample(clipped(model), (3, 1, 8, 8), solver, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_ddim_with_eta_0_is_deterministic_given_x_T(model):
    x_T = torch.randn(3, 1, 8, 8)
    a = sample(clipped(model), x_T.shape, DDIM(10), x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = sample(clipped(model), x_T.shape, DDIM(10), x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_close_to_fp32(model):
    x_T = torch.randn(3, 1, 8, 8)
    seen = []
    hook = model.stem.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    fp32 = sample(clipped(model), x_T.shape, DDIM(10), x_T=x_T)
    bf16 = sample(clipped(model, bf16=True), x_T.shape, DDIM(10), x_T=x_T)
    hook.remove()
    assert seen == [torch.float32] * 10 + [torch.bfloat16] * 10
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.05  # bf16 keeps about 3 significant digits


def test_sampling_turns_dropout_off_and_restores_training_mode(tiny_config):
    import dataclasses

    m = UNet(dataclasses.replace(tiny_config, dropout=0.5))
    m.train()
    a = sample(clipped(m), (2, 1, 8, 8), DDPM(), generator=torch.Generator().manual_seed(0))
    b = sample(clipped(m), (2, 1, 8, 8), DDPM(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and m.training


@pytest.mark.parametrize("solver", [DDPM(), DDIM(4, eta=1.0)], ids=["ddpm", "ddim"])
def test_batched_network_passes_give_the_images_of_one_batch(model, solver):
    seen = []
    hook = model.stem.register_forward_hook(lambda m, args, out: seen.append(len(out)))
    whole = sample(clipped(model), (5, 1, 8, 8), solver, generator=torch.Generator().manual_seed(3))
    assert set(seen) == {5}
    seen.clear()
    batched = sample(clipped(model, batch_size=2), (5, 1, 8, 8), solver, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert max(seen) == 2 and sum(seen) == 5 * len(seen) // 3  # chunks of 2, 2, 1 at every step
    torch.testing.assert_close(batched, whole)  # the same random draws: the same images


def test_bad_sampler_arguments_say_what_is_valid(model):
    with pytest.raises(ValueError, match="use one of ddim, heun, dpmpp2m, dpmpp3m, dpmpp3m-published for 5 steps"):
        next(sample_loop(clipped(model), (1, 1, 8, 8), DDPM(steps=5)))
    with pytest.raises(ValueError, match="beta_tilde, beta"):
        ddpm_step(torch.zeros(1), 3, torch.zeros(1), SMALL, variance="learned")
    for eta in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            DDIM(eta=eta)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        Denoiser(model, DiffusionConfig(T=20), batch_size=0)


class Scaled(torch.nn.Module):
    """A network whose output is ``net``'s times ``factor``, or a constant."""

    def __init__(self, net, factor=1.0, constant=None):
        super().__init__()
        self.net, self.factor, self.constant = net, factor, constant

    def forward(self, x, t):
        return torch.full_like(x, self.constant) if self.constant is not None else self.net(x, t) * self.factor


def test_check_network_passes_a_sound_network_and_refuses_blown_up_or_constant_ones(tiny_config):
    net = UNet(tiny_config)
    torch.nn.init.normal_(net.head[2].weight, std=0.1)  # a fresh U-Net's head is zero
    config = DiffusionConfig(T=20)
    check_network(Denoiser(Scaled(net), config), (1, 8, 8))
    with pytest.raises(DegenerateModelError, match=r"predictions at t=19 have an RMS of \d\.\d\de\+0\d, where a sound model's are about 1"):
        check_network(Denoiser(Scaled(net, 1e6), config), (1, 8, 8))
    with pytest.raises(DegenerateModelError, match="at t=19 are NaN or infinite"):
        check_network(Denoiser(Scaled(net, float("inf")), config), (1, 8, 8))
    with pytest.raises(DegenerateModelError, match="the same value for every input at t=19"):
        check_network(Denoiser(Scaled(net, constant=0.3), config), (1, 8, 8))


def test_check_samples_refuses_broken_or_all_flat_samples_and_keeps_real_ones():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert check_samples(x) is x
    x[1] = -1.0  # one blank image among real ones is drawn as it is
    check_samples(x)
    with pytest.raises(DegenerateModelError, match="all 2 samples are flat images of one grey level"):
        check_samples(torch.full((2, 1, 8, 8), -1.0))
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(DegenerateModelError, match="1 of the 3 samples hold NaN or inf"):
        check_samples(x)


def test_check_trajectory_stops_at_flat_finished_samples_after_yielding_the_steps_before():
    zeros = torch.zeros(2, 1, 4, 4)
    noisy, data = GridPoint(1, 0.9, 0.4), GridPoint(-1, 1.0, 0.0)
    real = [SamplerStep(0, noisy, torch.rand(2, 1, 4, 4), zeros), SamplerStep(1, data, torch.rand(2, 1, 4, 4), zeros)]
    assert list(check_trajectory(real)) == real
    flat = [real[0], SamplerStep(1, data, zeros, zeros)]
    seen = []
    with pytest.raises(DegenerateModelError, match="flat"):
        for step in check_trajectory(flat):
            seen.append(step.t)
    assert seen == [1]
