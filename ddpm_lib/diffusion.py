"""The forward process q and the training loss (Ho et al. 2020, Sections 2-3).

Conventions used throughout ddpm_lib:

* t is 0-based: t = 0 ... T-1, where schedule index t is the paper's timestep t + 1. "x_t" is
  the latent after t + 1 noising steps; the clean image is x0 (the paper's x_0).
* Images are float tensors of shape (B, C, H, W) with pixels in [-1, 1].
* A timestep argument ``t`` is an int or a (B,) long tensor with one timestep per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import parametrizations
from .parametrizations import PARAMETRIZATIONS, check_prediction
from .paths import PATHS, VP, GaussianPath, LinearFlow
from .schedules import SCHEDULES, NoiseSchedule, extract, get_schedule
from .weightings import loss_weights

MAX_T = 100_000  # diffusion steps; papers use up to 4,000. A checkpoint asking for 10^12 is refused before its schedule is built.


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "linear"  # the VP path's beta schedule, one of schedules.SCHEDULES
    T: int = 1000  # the VP path's number of diffusion steps
    prediction: str = "eps"  # what the network predicts, one of parametrizations.PREDICTIONS: "eps" (Ho et al.), "x0", "v", "velocity"
    path: str = "vp"  # the noise levels, one of paths.PATHS; a checkpoint saved without one is "vp"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.schedule!r}; valid names: {', '.join(SCHEDULES)}")
        check_prediction(self.prediction)
        if not isinstance(self.T, int) or not 1 <= self.T <= MAX_T:
            raise ValueError(f"T must be a whole number from 1 to {MAX_T:,}, got {self.T!r}")
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; valid choices: {', '.join(PATHS)}")
        if self.path == LinearFlow.name and self.prediction == "eps":
            raise ValueError("eps cannot give x0 where alpha = 0, at the linear flow's start: predict velocity, v or x0 on it")

    def make_schedule(self) -> NoiseSchedule:
        return get_schedule(self.schedule, self.T)

    def make_path(self) -> GaussianPath:
        """The path of this config: the VP path of its schedule, or the linear flow (which has no schedule)."""
        return VP(self.make_schedule()) if self.path == VP.name else LinearFlow()


def q_sample(x0: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) in closed form (Eq. 4): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    if noise is None:
        noise = torch.randn_like(x0)
    return extract(schedule.sqrt_alpha_bar, t, x0.shape) * x0 + extract(schedule.sqrt_one_minus_alpha_bar, t, x0.shape) * noise


def q_step(x_prev: torch.Tensor, t: int, schedule: NoiseSchedule, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Eq. 2).

    At t = 0, ``x_prev`` is the clean image x0.
    """
    if noise is None:
        noise = torch.randn_like(x_prev)
    beta = extract(schedule.betas, t, x_prev.shape)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


def q_chain(x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Run the forward chain one step at a time, yielding (t, x_t) for t = 0 ... T-1.

    Each step draws fresh noise (from ``generator`` when given, on the generator's device).
    By Eq. 4 the x_t it yields has the same distribution as ``q_sample(x0, t, schedule)``.
    """
    x = x0
    for t in range(schedule.T):
        device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device)
        x = q_step(x, t, schedule, noise)
        yield t, x


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the posterior q(x_{t-1} | x_t, x0) (Eqs. 6-7).

    mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    variance = beta tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, shaped (B, 1, 1, 1).
    """
    mean = extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0 + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    return mean, extract(schedule.posterior_variance, t, x_t.shape)


def correlation_with_x0(x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between each image and its noised version over the pixels, shape (B,).

    For data with pixel variance v, Eq. 4 predicts sqrt(a v) / sqrt(a v + 1 - a) with a = alpha_bar_t.
    """
    a = x0.flatten(1) - x0.flatten(1).mean(1, keepdim=True)
    b = x_t.flatten(1) - x_t.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# Conversions between the three things a network can predict. With a = alpha_bar_t:
#   x_t = sqrt(a) x0 + sqrt(1 - a) eps          (Eq. 4)
#   v   = sqrt(a) eps - sqrt(1 - a) x0          (Salimans & Ho 2022, Sec. 4)


def _scales(schedule: NoiseSchedule, t: torch.Tensor | int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), shaped to broadcast against ``shape``."""
    return extract(schedule.sqrt_alpha_bar, t, shape), extract(schedule.sqrt_one_minus_alpha_bar, t, shape)


def x0_from_eps(x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Eq. 4 solved for x0; Eq. 15)."""
    return parametrizations.x0_from_eps(x_t, eps, *_scales(schedule, t, x_t.shape))


def eps_from_x0(x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t) (Eq. 4 solved for eps)."""
    return parametrizations.eps_from_x0(x_t, x0, *_scales(schedule, t, x_t.shape))


def v_from(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule) -> torch.Tensor:
    """The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
    signal, noise = _scales(schedule, t, x0.shape)
    return signal * eps - noise * x0


def to_eps_x0(
    output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule, prediction: str = "eps"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network ``output`` of the given ``prediction`` (one of parametrizations.PREDICTIONS) into (eps, x0)."""
    return PARAMETRIZATIONS[prediction].to_eps_x0(output, x_t, *_scales(schedule, t, x_t.shape))


def min_snr_weight(t: torch.Tensor, schedule: NoiseSchedule, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Eq. 8) for a (B,) tensor of 0-based t of the VP path, shape (B,).

    Weighting the x0 error by min(SNR_t, gamma) stops the many nearly noise-free steps (huge SNR)
    from dominating training. In terms of the eps error (which is SNR_t times the x0 error) the weight
    is min(SNR_t, gamma) / SNR_t, in terms of the v error min(SNR_t, gamma) / (SNR_t + 1), and of the
    velocity error min(SNR_t, gamma) / (sqrt(SNR_t) + 1)^2: ``weightings.loss_weights`` on the VP path.
    """
    return loss_weights(VP(schedule), t, prediction, "min_snr", gamma)


def loss_simple(
    model: torch.nn.Module,
    x0: torch.Tensor,
    path: GaussianPath,
    prediction: str = "eps",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_simple (Eq. 14): || target - model(x_t, t) ||^2 with t drawn by the path (VP: Uniform{0, ..., T-1}) and
    x_t = alpha_t x0 + sigma_t eps (Eq. 4 on the VP path).

    The target is what ``prediction`` names (parametrizations.PARAMETRIZATIONS). ``t`` and ``noise`` are drawn
    (from ``generator``, on its device) when not given. ``reduction="none"`` returns the (B,)
    per-image losses, for example to bin the loss by timestep. ``y``, the (B,) class labels of a
    class-conditional model, is passed on as ``model(x_t, t, y)``.
    """
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        t = path.training_times(len(x0), generator, gen_device).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
    p = path.points(t, x0.shape)  # alpha and sigma (B, 1, ...)
    x_t = p.alpha * x0 + p.sigma * noise
    target = PARAMETRIZATIONS[prediction].target(x0, noise, p.alpha, p.sigma)
    x_in = x_t * path.input_scale(p)
    output = model(x_in, p.t) if y is None else model(x_in, p.t, y)
    per_image = F.mse_loss(output.float(), target, reduction="none").mean(dim=tuple(range(1, x0.ndim)))
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"unknown reduction {reduction!r}; valid choices: mean, none")
