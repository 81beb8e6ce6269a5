"""Noise schedules: the variances beta_t of the forward process.

Every schedule is a pure function of the number of steps T that returns the betas as a
float64 tensor of shape (T,). Index t is 0-based: ``betas[0]`` is the paper's beta_1 and
``betas[T - 1]`` its beta_T. A :class:`NoiseSchedule` derives everything else the forward
and reverse processes need from the betas, once, in float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_BETA = 0.999  # betas are clipped here: beta = 1 would erase x_{t-1} completely


def linear(T: int) -> torch.Tensor:
    """Ho et al. (2020): betas rise linearly from 1e-4 to 0.02 when T = 1000.

    For other T both end points are scaled by 1000 / T (as in improved-diffusion), so the
    forward process destroys the signal about as completely for any T; for T < 21 the end
    is clipped at MAX_BETA.
    """
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=MAX_BETA)


def cosine(T: int, s: float = 0.008, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Nichol & Dhariwal (2021), Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2.

    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped at ``max_beta`` to avoid the
    singularity at t = T.
    """
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def quadratic(T: int) -> torch.Tensor:
    """sqrt(beta) rises linearly between the linear schedule's end points (the DDPM code's "quad")."""
    scale = 1000 / T
    return (torch.linspace(math.sqrt(scale * 1e-4), math.sqrt(scale * 0.02), T, dtype=torch.float64) ** 2).clamp(max=MAX_BETA)


def sigmoid(T: int) -> torch.Tensor:
    """Betas follow a sigmoid over [-6, 6] between the linear schedule's end points (GeoDiff, Xu et al. 2022)."""
    scale = 1000 / T
    start, end = scale * 1e-4, scale * 0.02
    return (torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start).clamp(max=MAX_BETA)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear,
    "cosine": cosine,
    "quadratic": quadratic,
    "sigmoid": sigmoid,
}


@dataclass(frozen=True)
class NoiseSchedule:
    """Everything derived from the betas, each a tensor of shape (T,), indexed by 0-based t.

    Built once in float64 by :meth:`from_betas`; use :func:`extract` to read values for a
    batch of timesteps. ``alpha_bar_prev[t]`` is ``alpha_bar[t - 1]`` with alpha_bar_prev[0] = 1
    (the clean image is "step -1").
    """

    betas: torch.Tensor  # beta_t, variance of q(x_t | x_{t-1})
    alphas: torch.Tensor  # alpha_t = 1 - beta_t
    alpha_bar: torch.Tensor  # prod_{s <= t} alpha_s, signal kept by q(x_t | x0)
    alpha_bar_prev: torch.Tensor  # alpha_bar_{t-1}, 1 at t = 0
    posterior_variance: torch.Tensor  # beta tilde_t, variance of q(x_{t-1} | x_t, x0) (Eq. 7)
    posterior_log_variance_clipped: torch.Tensor  # log beta tilde, with beta tilde_0 = 0 replaced by beta tilde_1
    snr: torch.Tensor  # alpha_bar / (1 - alpha_bar), signal-to-noise ratio of x_t
    # Precomputed in float64, because 1 - alpha_bar in float32 loses digits near t = 0:
    sqrt_alpha_bar: torch.Tensor  # scale of x0 in x_t (Eq. 4)
    sqrt_one_minus_alpha_bar: torch.Tensor  # scale of eps in x_t (Eq. 4)
    posterior_mean_coef1: torch.Tensor  # sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), weight of x0 (Eq. 7)
    posterior_mean_coef2: torch.Tensor  # sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), weight of x_t (Eq. 7)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("every beta must lie strictly between 0 and 1")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        # beta tilde_0 is 0 (x0 is known exactly given x_0); its log would be -inf.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(betas) > 1 else betas
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=torch.log(clipped),
            snr=alpha_bar / (1 - alpha_bar),
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=(1 - alpha_bar).sqrt(),
            posterior_mean_coef1=alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
            posterior_mean_coef2=alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
        )

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with every tensor on ``device`` (float64 is kept)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def get_schedule(name: str, T: int) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of the named schedule with T steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    return NoiseSchedule.from_betas(SCHEDULES[name](T))


def extract(values: torch.Tensor, t: torch.Tensor | int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Read ``values[t]`` as float32, shaped to broadcast against a tensor of ``shape``.

    ``t`` is a 0-based int or a (B,) tensor of timesteps; the result has shape (B, 1, 1, ...)
    (or (1, 1, ...) for an int), with as many trailing ones as ``shape`` has dimensions after
    the batch dimension, so ``extract(schedule.alpha_bar, t, x.shape) * x`` works at any rank.
    """
    if isinstance(t, int):
        t = torch.tensor([t], device=values.device)  # stay on the schedule's device (CUDA while sampling on a GPU)
    out = values.to(t.device)[t].float()
    return out.reshape(len(t), *([1] * (len(shape) - 1)))
