"""The variational bound on -log p(x_0), in bits per dimension (Ho et al. 2020, Eq. 5).

    -log p_theta(x_0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0            (paper's 1-based t)

    L_T     = KL(q(x_T | x_0) || N(0, I))                              the prior: no parameters
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))      two Gaussians: closed form
    L_0     = -log p_theta(x_0 | x_1)                                  a Gaussian over 256 bins

In the code's 0-based t (0 ... T-1), ``terms[:, t]`` is the term whose x_t is ``q_sample(x0, t)``:
t = 0 is L_0 and t >= 1 is a KL term. The conventions are those of improved-diffusion (Nichol &
Dhariwal 2021, ``_vb_terms_bpd`` and ``calc_bpd_loop``): p_theta has the fixed variance beta
tilde with its clipped log (at t = 0 the value of t = 1), its mean is the posterior mean of the
predicted x_0 clipped to [-1, 1], and each term is a mean over the dimensions, in bits. Only the
Gaussian CDF differs: exact here (in float64), where improved-diffusion uses a tanh approximation.
Images are (B, C, H, W) with pixels k / 127.5 - 1 for k = 0 ... 255.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, sound_model
from .data import get_dataset
from .diffusion import q_posterior, q_sample, to_eps_x0
from .paths import VP
from .sampling import eval_mode
from .schedules import NoiseSchedule, extract


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats:
    (logvar2 - logvar1 + (exp(logvar1) + (mean1 - mean2)^2) / exp(logvar2) - 1) / 2."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, in nats, for pixels x in [-1, 1] on 256 levels under N(mean, exp(log_scale)^2).

    Each level owns the bin x +- 1/255; the lowest and highest bins reach out to -inf and +inf, so the
    256 probabilities sum to 1 (Ho et al. 2020, Eq. 13). Computed in float64 with the exact CDF.
    """
    x, mean, inv_std = x.double(), mean.double(), torch.exp(-log_scale.double())
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper edge)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-300))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """A per-element quantity in nats averaged over all but the batch dimension, in bits: shape (B,)."""
    return nats.flatten(1).mean(1) / math.log(2.0)


def prior_bpd(x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape (B,): how far the last step is from pure noise."""
    t = schedule.T - 1
    mean = extract(schedule.sqrt_alpha_bar, t, x0.shape).double() * x0.double()
    logvar = torch.log1p(-schedule.alpha_bar[t]).to(x0.device).expand_as(mean)
    return mean_bits(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)))


@torch.inference_mode()
def vb_term_bpd(
    model: nn.Module,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    prediction: str = "eps",
) -> torch.Tensor:
    """The bound's term at 0-based ``t`` for x_t (drawn from q(x_t | x0)), in bits per dimension, shape (B,).

    t >= 1: KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)); t = 0: -log p_theta(x0 | x_t), discretized.
    """
    log_var = schedule.posterior_log_variance_clipped[t].to(x0.device)  # fixed beta tilde_t, clipped at t = 0
    output = model(x_t, torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)).float()
    _, x0_pred = to_eps_x0(output, x_t, t, schedule, prediction)
    model_mean, _ = q_posterior(x0_pred.clamp(-1, 1), x_t, t, schedule)  # (B, C, H, W)
    if t == 0:
        return mean_bits(-discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var))
    true_mean, _ = q_posterior(x0, x_t, t, schedule)
    log_var = log_var.expand_as(true_mean)
    return mean_bits(normal_kl(true_mean.double(), log_var, model_mean.double(), log_var))


def bound_weights(schedule: NoiseSchedule, variance: str = "beta_tilde") -> torch.Tensor:
    """lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)), shape (T,), float64: the weight of
    E||eps - eps_theta(x_t, t)||^2 in the KL term L_{t-1} with sigma_t^2 = beta tilde_t or beta_t (Eq. 12).

    L_simple sets every lambda_t to 1. Entry 0 (the code's t = 0, the decoder L_0, which is not a KL
    term) uses beta tilde's clipped value, as the bound itself does.
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown variance {variance!r}; valid choices: beta_tilde, beta")
    sigma2 = schedule.posterior_log_variance_clipped.exp() if variance == "beta_tilde" else schedule.betas
    return schedule.betas**2 / (2 * sigma2 * schedule.alphas * (1 - schedule.alpha_bar))


class Bound(NamedTuple):
    terms: torch.Tensor  # (B, T) bits/dim by 0-based t: L_0 at t = 0, the KL terms at t >= 1
    prior: torch.Tensor  # (B,) L_T in bits/dim
    total: torch.Tensor  # (B,) the bound: prior + every term, bits/dim


def variational_bound(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
) -> Bound:
    """The bound of every image x0 (B, C, H, W), one draw of x_t per timestep (improved-diffusion's calc_bpd_loop).

    The noise comes from ``generator`` (on its device), from t = T-1 down to 0, so a seed fixes the result.
    """
    device = next(model.parameters()).device
    x0, schedule = x0.to(device), schedule.to(device)
    gen_device = generator.device if generator is not None else device
    terms = torch.zeros(len(x0), schedule.T, dtype=torch.float64)
    with eval_mode(model):
        for t in range(schedule.T - 1, -1, -1):
            noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
            terms[:, t] = vb_term_bpd(model, x0, q_sample(x0, t, schedule, noise), t, schedule, prediction).cpu()
    prior = prior_bpd(x0, schedule).cpu()
    return Bound(terms, prior, prior + terms.sum(1))


def bound_table(bound: Bound) -> list[tuple[str, float]]:
    """(name, mean bits/dim over the images) of the prior, the KL terms summed over each quarter of t, and L_0."""
    T = bound.terms.shape[1]
    rows = [("prior L_T", bound.prior.mean().item())]
    edges = [max(1, round(T * q / 4)) for q in range(5)]  # quarters of t = 1 ... T-1 (0-based)
    for lo, hi in reversed(list(zip(edges[:-1], edges[1:], strict=True))):
        if hi > lo:
            rows.append((f"KL terms, t = {lo} ... {hi - 1}", bound.terms[:, lo:hi].sum(1).mean().item()))
    rows.append(("L_0 (t = 0, 256 bins)", bound.terms[:, 0].mean().item()))
    return rows


def bound_of_test_images(
    checkpoint: str | os.PathLike,
    num: int,
    seed: int = 0,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    batch: int = 256,
) -> tuple[str, Bound]:
    """The bound of the first ``num`` test images of ``dataset`` (None: the one the checkpoint was trained on, else
    mnist) under the checkpoint's EMA model, in batches of ``batch`` images, the noise of every x_t seeded ``seed``:
    the dataset's name and the :class:`Bound`. What ``python -m ddpm_lib nll`` runs.

    A checkpoint whose network is unsound, a path other than VP (the bound is Ho et al.'s discrete one), a folder
    dataset (no test split), too many images or images of another shape are refused, before T passes per image, with
    a ValueError naming the flag to change; a bound that is NaN or infinite anywhere is a CheckpointError.
    """
    state = load_checkpoint(checkpoint)
    model, diffusion = sound_model(state, checkpoint)  # a blown-up network is refused before T passes per image
    if diffusion.path != VP.name:
        raise ValueError(f"nll computes the VP path's discrete bound (Ho et al. Eq. 5); {checkpoint} is a {diffusion.path} model")
    saved = state.get("train_config")
    name = dataset or (saved.get("dataset") if isinstance(saved, dict) else None) or "mnist"
    if name == "folder":
        raise ValueError(f"{checkpoint} was trained on a folder of images, which has no test split; pass --dataset")
    test = get_dataset(name, data_root, train=False)
    if num > len(test):
        raise ValueError(f"--num {num}: the {name} test set has {len(test)} images")
    x0 = torch.stack([test[i][0] for i in range(num)])  # (N, C, H, W)
    c = model.config
    if tuple(x0.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
        raise ValueError(f"{name} images are {tuple(x0.shape[1:])}, but the model takes {(c.in_channels, c.image_size, c.image_size)}")
    model, schedule, generator = model.to(device), diffusion.make_schedule(), torch.Generator().manual_seed(seed)
    bounds = [variational_bound(model, part, schedule, diffusion.prediction, generator) for part in x0.split(batch)]
    bound = Bound(*(torch.cat(parts) for parts in zip(*bounds, strict=True)))
    if not torch.isfinite(bound.total).all():  # never "bits/dim: nan" with status 0
        bad = (~torch.isfinite(bound.total)).sum().item()
        raise CheckpointError(f"the bound of {bad} of the {num} images is NaN or infinite: {checkpoint}'s network is unsound there")
    return name, bound
