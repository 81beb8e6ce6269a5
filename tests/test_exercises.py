import pytest
import torch

from ddpm_lib.diffusion import loss_simple, q_sample
from ddpm_lib.exercises import (
    check_alpha_bar,
    check_ddim_step,
    check_ddpm_step,
    check_flow_matching_loss,
    check_frechet_distance,
    check_guided_eps,
    check_heun_step,
    check_loss_simple,
    check_q_posterior_mean,
    check_q_sample,
    check_timestep_embedding,
)
from ddpm_lib.paths import VP
from ddpm_lib.sampling import ddpm_step
from ddpm_lib.schedules import extract
from ddpm_lib.unet import timestep_embedding


def correct_ddpm_step(x_t, t, eps, schedule, noise):
    return ddpm_step(x_t, t, eps, schedule, noise, clip_x0=False).x_prev


def posterior_mean(x0, x_t, t, schedule, prev_in_x0=True, sqrt_alpha=True, prev_in_x_t=True, swap=False, shift=0):
    """Eq. 7 written out from alpha, alpha_bar and beta, with switches for the usual mistakes."""
    t = t - shift
    a, a_bar, beta = (extract(v, t, x0.shape) for v in (schedule.alphas, schedule.alpha_bar, schedule.betas))
    a_bar_prev = extract(schedule.alpha_bar_prev, t, x0.shape)
    c1 = (a_bar_prev if prev_in_x0 else a_bar).sqrt() * beta / (1 - a_bar)
    c2 = (a.sqrt() if sqrt_alpha else a) * (1 - (a_bar_prev if prev_in_x_t else a_bar)) / (1 - a_bar)
    return c2 * x0 + c1 * x_t if swap else c1 * x0 + c2 * x_t


def ddim_by_hand(x_t, t, t_prev, eps, schedule, eta, noise, swap=False, clip=True, rederive=True, sigma_inside=True, sigma_sqrt=True):
    """Song et al.'s Eqs. 12 and 16 written out, with switches for the usual mistakes."""
    a, a_prev = schedule.alpha_bar[t].item(), schedule.alpha_bar[t_prev].item()
    product = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    sigma = eta * (product**0.5 if sigma_sqrt else product)
    x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
    if clip:
        x0 = x0.clamp(-1, 1)
        if rederive:
            eps = (x_t - a**0.5 * x0) / (1 - a) ** 0.5
    target = a if swap else a_prev
    direction = max(1 - target - sigma**2, 0.0) ** 0.5 if sigma_inside else (1 - target) ** 0.5 - sigma
    return target**0.5 * x0 + direction * eps + sigma * noise


def guided_by_hand(model, x_t, t, y, w, schedule, sign=1, uncond_label="none", in_x0=False, return_x0=False):
    """Classifier-free guidance with two separate passes (the unconditional one with y=None): an independent route."""
    cond = model(x_t, t, y)
    uncond = {"none": lambda: model(x_t, t), "same": lambda: cond, "zero": lambda: model(x_t, t, torch.zeros_like(y))}[uncond_label]()
    if sign < 0:
        cond, uncond = uncond, cond
    if not (in_x0 or return_x0):
        return (1 + w) * cond - w * uncond
    a = extract(schedule.alpha_bar, t, x_t.shape)
    x0 = [((x_t - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1) for e in (cond, uncond)]
    guided = (1 + w) * x0[0] - w * x0[1]
    return guided if return_x0 else (x_t - a.sqrt() * guided) / (1 - a).sqrt()


def frechet_via_eigvals(mu_a, sigma_a, mu_b, sigma_b, cross=2.0, mean_power=2):
    """Tr (S_a S_b)^(1/2) from the (real, non-negative) eigenvalues of the non-symmetric S_a S_b: an independent route."""
    tr_sqrt = torch.linalg.eigvals(sigma_a @ sigma_b).real.clamp(min=0).sqrt().sum()
    return (mu_a - mu_b).square().sum() ** (mean_power / 2) + sigma_a.trace() + sigma_b.trace() - cross * tr_sqrt


@pytest.mark.parametrize(
    "check, fn",
    [
        (check_q_sample, q_sample),
        (check_q_posterior_mean, posterior_mean),
        (check_alpha_bar, lambda betas: torch.cumprod(1 - betas, 0)),
        (check_timestep_embedding, timestep_embedding),
        (check_ddpm_step, correct_ddpm_step),
        (check_ddim_step, ddim_by_hand),
        (check_loss_simple, lambda model, x0, t, noise, schedule: loss_simple(model, x0, VP(schedule), t=t, noise=noise)),
        (check_frechet_distance, frechet_via_eigvals),
        (check_guided_eps, guided_by_hand),
    ],
)
def test_the_reference_solutions_pass(check, fn, capsys):
    assert check(fn) is True
    assert capsys.readouterr().out.startswith("✓")


def wrong_alpha(x0, t, schedule, noise):
    a = extract(schedule.alphas, t, x0.shape)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def no_sqrt(x0, t, schedule, noise):
    a = extract(schedule.alpha_bar, t, x0.shape)
    return a * x0 + (1 - a) * noise


def one_based(x0, t, schedule, noise):
    return q_sample(x0, t - 1, schedule, noise)  # the checker's t are all >= 1


def heun_by_hand(denoiser, x_t, p, p_next, euler_only=False, end_slope=False, plain=False):
    if plain:  # stepping x by the change of sigma, as if x~ were x
        h = p_next.sigma - p.sigma
        eps = denoiser(x_t, p).eps
        return x_t + h * (eps + denoiser(x_t + h * eps, p_next).eps) / 2
    h = p_next.sigma / p_next.alpha - p.sigma / p.alpha
    eps = denoiser(x_t, p).eps
    euler = p_next.alpha * (x_t / p.alpha + h * eps)
    if euler_only:
        return euler
    end = denoiser(euler, p_next).eps
    return p_next.alpha * (x_t / p.alpha + h * (end if end_slope else (eps + end) / 2))


def flow_matching_by_hand(model, x0, s, eps, target="eps - x0", data_at_one=False, reduce="mean"):
    s = s[:, None]
    x_s = s * x0 + (1 - s) * eps if data_at_one else (1 - s) * x0 + s * eps
    wanted = {"eps - x0": eps - x0, "x0 - eps": x0 - eps, "eps": eps}[target]
    squared = (model(x_s, s[:, 0]) - wanted).square()
    return squared.sum(1).mean() if reduce == "sum" else squared.mean()


@pytest.mark.parametrize(
    "check, fn, hint",
    [
        (check_heun_step, lambda *args: heun_by_hand(*args, euler_only=True), "Euler's step (deterministic DDIM) alone"),
        (check_heun_step, lambda *args: heun_by_hand(*args, end_slope=True), "slope at the end alone"),
        (check_heun_step, lambda *args: heun_by_hand(*args, plain=True), "you stepped x itself"),
        (check_heun_step, heun_by_hand, "✓"),
        (check_flow_matching_loss, lambda *args: flow_matching_by_hand(*args, target="x0 - eps"), "you regressed on x0 - eps"),
        (check_flow_matching_loss, lambda *args: flow_matching_by_hand(*args, data_at_one=True), "you put the data at s = 1"),
        (check_flow_matching_loss, lambda *args: flow_matching_by_hand(*args, target="eps"), "not the noise eps alone"),
        (check_flow_matching_loss, lambda *args: flow_matching_by_hand(*args, reduce="sum"), "yours sums over them"),
        (check_flow_matching_loss, flow_matching_by_hand, "✓"),
        (check_q_sample, wrong_alpha, "alpha_t (one step)"),
        (check_q_sample, no_sqrt, "square roots are missing"),
        (check_q_sample, one_based, "off by one step"),
        (check_q_sample, lambda x0, t, s, noise: x0 * 0, "wrong values"),
        (check_q_posterior_mean, lambda *args: posterior_mean(*args, prev_in_x0=False), "sqrt(alpha_bar_{t-1}), one step before t"),
        (check_q_posterior_mean, lambda *args: posterior_mean(*args, sqrt_alpha=False), "square root of alpha_t is missing"),
        (check_q_posterior_mean, lambda *args: posterior_mean(*args, prev_in_x_t=False), "(1 - alpha_bar_{t-1}) on top"),
        (check_q_posterior_mean, lambda *args: posterior_mean(*args, swap=True), "swapped"),
        (check_q_posterior_mean, lambda *args: posterior_mean(*args, shift=1), "off by one step"),
        (check_ddim_step, lambda *args: ddim_by_hand(*args, swap=True), "swapped"),
        (check_ddim_step, lambda *args: ddim_by_hand(*args, clip=False), "clip the predicted x0"),
        (check_ddim_step, lambda *args: ddim_by_hand(*args, rederive=False), "derive eps from it again"),
        (check_ddim_step, lambda *args: ddim_by_hand(*args, sigma_inside=False), "belongs under the square root"),
        (check_ddim_step, lambda *args: ddim_by_hand(*args, sigma_sqrt=False), "eta times the square root"),
        (check_alpha_bar, lambda betas: torch.cumprod(betas, 0), "cumulative product of the betas"),
        (check_alpha_bar, lambda betas: 1 - torch.cumsum(betas, 0), "a sum, not a product"),
        (check_timestep_embedding, lambda t, d: timestep_embedding(t, d).roll(d // 2, 1), "swapped"),
        (check_ddpm_step, lambda x_t, t, eps, s, z: ddpm_step(x_t, t, eps, s, z, variance="beta", clip_x0=False).x_prev, "beta tilde"),
        (check_ddpm_step, lambda x_t, t, eps, s, z: ddpm_step(x_t, t, eps, s, z * 0, clip_x0=False).x_prev, "noise is missing"),
        (check_loss_simple, lambda model, x0, t, noise, s: ((x0 - model(q_sample(x0, t, s, noise), t)) ** 2).mean(), "not the clean image"),
        (check_loss_simple, lambda model, x0, t, noise, s: ((noise - model(q_sample(x0, t, s, noise), t)) ** 2).sum(), "a sum"),
        (check_guided_eps, lambda *args: guided_by_hand(*args, sign=-1), "the sign of w"),
        (check_guided_eps, lambda *args: guided_by_hand(*args, uncond_label="same"), "forgot the null class"),
        (check_guided_eps, lambda *args: guided_by_hand(*args, uncond_label="zero"), "label 0 is the digit 0"),
        (check_guided_eps, lambda *args: guided_by_hand(*args, in_x0=True), "guide eps, not x0"),
        (check_guided_eps, lambda *args: guided_by_hand(*args, return_x0=True), "not the predicted x0"),
        (check_frechet_distance, lambda *args: frechet_via_eigvals(*args, cross=1.0), "factor 2"),
        (check_frechet_distance, lambda *args: frechet_via_eigvals(*args, mean_power=1), "squared distance"),
        (check_frechet_distance, lambda ma, sa, mb, sb: float(frechet_via_eigvals(ma, sa, mb, sb)) + 1.0, "wrong values"),
        (
            check_frechet_distance,
            lambda ma, sa, mb, sb: (ma - mb).square().sum() + sa.trace() + sb.trace() - 2 * (sa @ sb).trace().sqrt(),
            "not the square root of the trace",
        ),
    ],
)
def test_known_mistakes_get_their_own_hint(check, fn, hint, capsys):
    assert check(fn) is (hint == "✓")  # one written right, as a control
    out = capsys.readouterr().out
    assert out.startswith("✓" if hint == "✓" else "✗") and hint in out, out


def test_the_t0_noise_mistake_is_named(capsys):
    def adds_noise_at_t0(x_t, t, eps, schedule, noise):
        out = ddpm_step(x_t, t, eps, schedule, noise, clip_x0=False).x_prev
        return out + schedule.betas[0].sqrt().float() * noise if t == 0 else out

    assert check_ddpm_step(adds_noise_at_t0) is False
    assert "no noise is added" in capsys.readouterr().out


def test_stubs_errors_and_wrong_shapes_are_reported_not_raised(capsys):
    def stub(*args):
        raise NotImplementedError

    assert check_q_sample(stub) is False and "not attempted yet" in capsys.readouterr().out
    assert check_q_sample(lambda *a: 1 / 0) is False and "ZeroDivisionError" in capsys.readouterr().out
    assert check_q_sample(lambda x0, *a: x0[0]) is False and "returned shape (1, 6, 6)" in capsys.readouterr().out
    assert check_alpha_bar(lambda b: b.tolist()) is False and "returned a list" in capsys.readouterr().out
