import pytest
import torch

from ddpm_lib.diffusion import (
    DiffusionConfig,
    correlation_with_x0,
    eps_from_x0,
    loss_simple,
    min_snr_weight,
    q_chain,
    q_posterior,
    q_sample,
    to_eps_x0,
    v_from,
    x0_from_eps,
)
from ddpm_lib.parametrizations import PREDICTIONS
from ddpm_lib.paths import VP
from ddpm_lib.schedules import get_schedule

SCHEDULE = get_schedule("linear", 1000)


def test_closed_form_and_step_by_step_chain_agree_in_mean_and_variance():
    # 4 pixel values, each repeated N times: the chain's empirical moments must match Eq. 4.
    N = 20_000
    values = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    x0 = values.repeat_interleave(N).reshape(-1, 1, 1, 1)
    checkpoints = {0, 10, 100, 500, 999}
    generator = torch.Generator().manual_seed(0)
    for t, x_t in q_chain(x0, SCHEDULE, generator):
        if t not in checkpoints:
            continue
        a = SCHEDULE.alpha_bar[t].item()
        closed = q_sample(x0, torch.full((len(x0),), t), SCHEDULE)
        for sample in (x_t, closed):
            per_value = sample.reshape(4, N)
            mean_err = (per_value.mean(1) - a**0.5 * values).abs()
            var_rel_err = (per_value.var(1) / (1 - a) - 1).abs()
            assert (mean_err < 5 * ((1 - a) / N) ** 0.5).all(), (t, mean_err)  # 5 standard errors
            assert (var_rel_err < 5 * (2 / N) ** 0.5).all(), (t, var_rel_err)
        if t == max(checkpoints):
            break


def test_q_sample_with_given_noise_is_eq_4():
    x0, eps = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    a = SCHEDULE.alpha_bar[t].float().reshape(3, 1, 1, 1)
    torch.testing.assert_close(q_sample(x0, t, SCHEDULE, eps), a.sqrt() * x0 + (1 - a).sqrt() * eps)


@pytest.mark.parametrize("t", [1, 7, 500, 999])
def test_posterior_matches_bayes_rule(t):
    # q(x_{t-1} | x0) = N(sqrt(ab_prev) x0, 1 - ab_prev) times q(x_t | x_{t-1}) = N(sqrt(a) x_{t-1}, beta):
    # a product of Gaussians, computed here in float64 independently of Eqs. 6-7.
    x0, x_t = torch.rand(2, 1, 3, 3) * 2 - 1, torch.randn(2, 1, 3, 3)
    ab_prev, a, beta = SCHEDULE.alpha_bar_prev[t], SCHEDULE.alphas[t], SCHEDULE.betas[t]
    precision = 1 / (1 - ab_prev) + a / beta
    var = 1 / precision
    mean = var * (ab_prev.sqrt() * x0.double() / (1 - ab_prev) + a.sqrt() * x_t.double() / beta)
    got_mean, got_var = q_posterior(x0, x_t, t, SCHEDULE)
    torch.testing.assert_close(got_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_var.flatten()[0], var.float(), rtol=1e-5, atol=0)


def test_posterior_at_t0_is_x0_exactly():
    x0, x_t = torch.rand(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mean, var = q_posterior(x0, x_t, 0, SCHEDULE)
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_type_round_trips_to_eps_and_x0(prediction):
    x0, eps = torch.rand(4, 1, 5, 5) * 2 - 1, torch.randn(4, 1, 5, 5)
    t = torch.tensor([0, 10, 500, 990])
    x_t = q_sample(x0, t, SCHEDULE, eps)
    target = {"eps": eps, "x0": x0, "v": v_from(x0, eps, t, SCHEDULE), "velocity": eps - x0}[prediction]
    got_eps, got_x0 = to_eps_x0(target, x_t, t, SCHEDULE, prediction)
    torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(got_eps, eps, atol=2e-4, rtol=0)


def test_eps_x0_conversions_invert_each_other():
    x_t, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([3, 300, 900])
    torch.testing.assert_close(eps_from_x0(x_t, t, x0_from_eps(x_t, t, eps, SCHEDULE), SCHEDULE), eps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_simple_is_zero_for_an_oracle_and_one_for_a_zero_model(prediction):
    x0, eps = torch.rand(64, 1, 4, 4) * 2 - 1, torch.randn(64, 1, 4, 4)
    t = torch.randint(0, 1000, (64,))
    target = {"eps": eps, "x0": x0, "v": v_from(x0, eps, t, SCHEDULE), "velocity": eps - x0}[prediction]

    def oracle(x_t, t_in):
        assert torch.equal(t_in, t)
        return target

    assert loss_simple(oracle, x0, VP(SCHEDULE), prediction, t=t, noise=eps).item() == pytest.approx(0, abs=1e-12)
    per_image = loss_simple(lambda x_t, t: torch.zeros_like(x_t), x0, VP(SCHEDULE), prediction, t=t, noise=eps, reduction="none")
    assert per_image.shape == (64,)
    torch.testing.assert_close(per_image, (target**2).mean(dim=(1, 2, 3)))


def test_loss_simple_draws_t_and_noise_from_the_generator():
    x0 = torch.rand(8, 1, 4, 4)

    def model(x_t, t):
        return x_t * 0.5

    a = loss_simple(model, x0, VP(SCHEDULE), generator=torch.Generator().manual_seed(1))
    b = loss_simple(model, x0, VP(SCHEDULE), generator=torch.Generator().manual_seed(1))
    c = loss_simple(model, x0, VP(SCHEDULE), generator=torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_min_snr_weights_clip_the_snr_at_gamma():
    t = torch.tensor([0, 50, 200, 999])
    snr = SCHEDULE.snr[t].float()
    assert snr[0] > 5 > snr[-1]  # both sides of gamma = 5
    torch.testing.assert_close(min_snr_weight(t, SCHEDULE, 5.0, "x0"), snr.clamp(max=5))
    torch.testing.assert_close(min_snr_weight(t, SCHEDULE, 5.0, "eps"), torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    # the velocity error eps - x0 is -(alpha + sigma) / sigma times the x0 error: its weight times that squared is min(SNR, 5)
    alpha, sigma = SCHEDULE.sqrt_alpha_bar[t].float(), SCHEDULE.sqrt_one_minus_alpha_bar[t].float()
    torch.testing.assert_close(min_snr_weight(t, SCHEDULE, 5.0, "velocity") * ((alpha + sigma) / sigma) ** 2, snr.clamp(max=5))


def test_min_snr_weighted_losses_agree_across_predictions():
    # One imperfect prediction, expressed as eps, x0 and v: each weighted squared error must be the same number.
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 40, 300, 900])
    x0, eps = torch.rand(4, 1, 5, 5, generator=g) * 2 - 1, torch.randn(4, 1, 5, 5, generator=g)
    x_t = q_sample(x0, t, SCHEDULE, eps)
    eps_hat = eps + 0.1 * torch.randn(4, 1, 5, 5, generator=g)
    x0_hat = x0_from_eps(x_t, t, eps_hat, SCHEDULE)
    errors = {"eps": eps_hat - eps, "x0": x0_hat - x0, "v": v_from(x0_hat, eps_hat, t, SCHEDULE) - v_from(x0, eps, t, SCHEDULE)}
    weighted = {p: min_snr_weight(t, SCHEDULE, 5.0, p) * e.square().mean(dim=(1, 2, 3)) for p, e in errors.items()}
    torch.testing.assert_close(weighted["x0"], weighted["eps"], rtol=1e-3, atol=0)
    torch.testing.assert_close(weighted["v"], weighted["eps"], rtol=1e-3, atol=0)


def test_diffusion_config_validates_choices():
    with pytest.raises(ValueError, match="eps, x0, v"):
        DiffusionConfig(prediction="score")
    with pytest.raises(ValueError, match="valid names: linear"):
        DiffusionConfig(schedule="nope")
    assert DiffusionConfig(schedule="cosine", T=50).make_schedule().T == 50
    for T in (0, 10**8, 10**12):  # a checkpoint's T: refused before its schedule is built
        with pytest.raises(ValueError, match=f"T must be a whole number from 1 to 100,000, got {T}"):
            DiffusionConfig(T=T)


def test_correlation_with_x0_follows_eq_4():
    x0 = torch.rand(64, 1, 16, 16) * 2 - 1  # uniform pixels: variance 1/3
    for t in (0, 200, 400, 700):
        a = SCHEDULE.alpha_bar[t].item()
        predicted = (a / 3) ** 0.5 / (a / 3 + 1 - a) ** 0.5
        measured = correlation_with_x0(x0, q_sample(x0, t, SCHEDULE)).mean().item()
        assert abs(measured - predicted) < 0.02, (t, measured, predicted)
    assert torch.allclose(correlation_with_x0(x0, 2 * x0 + 1), torch.ones(64))
