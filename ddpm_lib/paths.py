"""The path: the noise levels of x_t = alpha x0 + sigma eps, as data that the denoiser and every solver read.

A :class:`GridPoint` holds what one step needs: the time ``t`` the network is fed, and alpha and sigma.
A path gives

* :meth:`point`: the point at any time;
* :meth:`grid`: a trailing grid of points for a step count, from pure noise down to the data;
* :meth:`points`: the points of a batch of training times, shaped to broadcast against the images;
* :meth:`training_times`: training times drawn for a batch (``time_samplers`` name the ways), and :meth:`snr`, their
  signal-to-noise ratios alpha^2 / sigma^2;
* :meth:`input_scale`: the factor x_t is multiplied by before the network sees it;
* :meth:`export`: the grid as JSON for runtimes without Python (the site's live sampler, worker.js).

Two paths:

* :class:`VP`, Ho et al.'s variance-preserving path over a discrete schedule: alpha_t = sqrt(alpha_bar_t),
  sigma_t = sqrt(1 - alpha_bar_t), alpha^2 + sigma^2 = 1. Its time is the 0-based index t = 0 ... T-1
  (the paper's t + 1), and t = -1 is the data.
* :class:`LinearFlow`, the straight line of rectified flow and flow matching: alpha = 1 - s, sigma = s for
  continuous s in [0, 1], s = 0 the data and s = 1 pure noise (alpha = 0). Its network is fed t = 1000 s.

Solvers see alpha and sigma only through grid points (lambda = log(alpha / sigma) comes from the point), so a
path is all a new kind of model has to add. Pixels are in [-1, 1]; images are (B, C, H, W).
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from .schedules import NoiseSchedule, extract


class GridPoint(NamedTuple):
    """One noise level: x_t = alpha x0 + sigma eps. Floats on a grid; (B, 1, ...) tensors from :meth:`VP.points`."""

    t: float  # what the network is fed as its time (VP: the 0-based index, -1 at the data; linear flow: 1000 s)
    alpha: float  # the scale of x0 in x_t
    sigma: float  # the scale of eps in x_t

    @property
    def lam(self) -> float:
        """lambda = log(alpha / sigma), the half log-SNR: -inf at pure noise (alpha = 0), inf at the data (sigma = 0)."""
        if self.sigma == 0:
            return math.inf
        if self.alpha == 0:
            return -math.inf
        return math.log(self.alpha / self.sigma)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The ``steps`` 0-based timesteps a solver visits on a discrete schedule, from high to low, evenly spaced and "trailing".

    t_i = round(T - i * T / steps) - 1 for i = 0 ... steps-1 (Lin et al. 2024, Table 2): the
    first step is always at T - 1, where x_T is pure noise, and steps = T visits every t.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"the number of sampling steps must be between 1 and T={T}, got {steps}")
    return [round(T - i * T / steps) - 1 for i in range(steps)]


class VP:
    """The variance-preserving path of a discrete :class:`~ddpm_lib.schedules.NoiseSchedule` (Ho et al. 2020, Eq. 4)."""

    name: ClassVar[str] = "vp"
    time_samplers: ClassVar[tuple[str, ...]] = ("uniform",)  # how training times can be drawn
    default_solver: ClassVar[str] = "ddpm"  # what sample and gif use without --sampler: ancestral sampling (Ho et al.)

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    @property
    def default_steps(self) -> int:
        return self.schedule.T

    def point(self, t: int) -> GridPoint:
        """The point at 0-based t (0 ... T-1), in float64; t = -1 is the data: alpha = 1, sigma = 0."""
        if t == -1:
            return GridPoint(-1, 1.0, 0.0)
        if not 0 <= t < self.schedule.T:
            raise ValueError(f"t must be a 0-based timestep from -1 (the data) to T-1={self.schedule.T - 1}, got {t}")
        a_bar = self.schedule.alpha_bar[t].item()
        return GridPoint(t, math.sqrt(a_bar), math.sqrt(1 - a_bar))

    def grid(self, steps: int | None = None) -> list[GridPoint]:
        """``steps`` trailing timesteps (:func:`ddim_timesteps`; None: all T), then the data: steps + 1 points."""
        return [self.point(t) for t in [*ddim_timesteps(self.schedule.T, steps or self.schedule.T), -1]]

    def points(self, t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> GridPoint:
        """The points of a (B,) tensor of 0-based t, alpha and sigma as float32 (B, 1, ...) broadcasting against ``shape``."""
        return GridPoint(t, extract(self.schedule.sqrt_alpha_bar, t, shape), extract(self.schedule.sqrt_one_minus_alpha_bar, t, shape))

    def training_times(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None, sampler: str = "uniform"
    ) -> torch.Tensor:
        """(n,) 0-based timesteps drawn uniformly from 0 ... T-1 (Ho et al., Alg. 1), on the generator's device."""
        return torch.randint(0, self.schedule.T, (n,), generator=generator, device=device)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar) of a (B,) tensor of 0-based t, float64 (B,), as the schedule holds it."""
        return self.schedule.snr.to(t.device)[t]

    def time_density(self, t: torch.Tensor, sampler: str = "uniform") -> torch.Tensor:
        """The density of ``training_times`` at the 0-based t: 1 / T at each."""
        return torch.full(t.shape, 1 / self.schedule.T, dtype=torch.float64)

    def input_scale(self, p: GridPoint) -> float:
        """1: the VP path keeps x_t at about unit variance for data of unit variance."""
        return 1.0

    def to(self, device: torch.device | str) -> VP:
        """The same path with its schedule on ``device``, where training reads it."""
        return VP(self.schedule.to(device))

    def export(self) -> dict:
        """A "trailing" grid: [t, alpha, sigma, input scale] of every t (float64, index t), then the data; a grid of
        k steps takes the points at :func:`ddim_timesteps` (T, k), then the data."""
        points = [self.point(t) for t in range(self.schedule.T)]
        return {"name": self.name, "grid": "trailing", "points": [[*p, self.input_scale(p)] for p in points], "data": [-1, 1.0, 0.0, 1.0]}


class LinearFlow:
    """The linear path x_s = (1 - s) x0 + s eps, s in [0, 1] (Liu et al. 2023; Lipman et al. 2023): alpha = 1 - s, sigma = s."""

    name: ClassVar[str] = "linear_flow"
    time_samplers: ClassVar[tuple[str, ...]] = ("uniform", "logit_normal")  # uniform s, or s = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024)
    default_solver: ClassVar[str] = "ddim"  # Euler's method, rectified flow's sampler
    TIME_SCALE: ClassVar[float] = 1000.0  # the network is fed t = 1000 s: the range the U-Net's time embedding was built for
    default_steps: ClassVar[int] = 100  # the steps a solver takes when none are asked for

    def point(self, s: float) -> GridPoint:
        """The point at s in [0, 1], in float64: s = 1 pure noise (alpha = 0), s = 0 the data (sigma = 0)."""
        if not 0 <= s <= 1:
            raise ValueError(f"s must lie in [0, 1] (1: pure noise, 0: the data), got {s}")
        return GridPoint(self.TIME_SCALE * s, 1.0 - s, float(s))

    def grid(self, steps: int | None = None) -> list[GridPoint]:
        """``steps`` equal steps in s from 1 (pure noise) to 0 (the data): steps + 1 points."""
        steps = steps or self.default_steps
        if steps < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
        return [self.point(1 - i / steps) for i in range(steps + 1)]

    def points(self, s: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> GridPoint:
        """The points of a (B,) tensor of s, alpha and sigma as float32 (B, 1, ...) broadcasting against ``shape``."""
        s64 = s.double().reshape(len(s), *([1] * (len(shape) - 1)))
        return GridPoint(self.TIME_SCALE * s, (1 - s64).float(), s64.float())

    def training_times(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None, sampler: str = "uniform"
    ) -> torch.Tensor:
        """(n,) times s in (0, 1), float64, on the generator's device: uniform, or "logit_normal", s = sigmoid(n) with
        n ~ N(0, 1), which draws the middle of the path more often (Esser et al. 2024, Stable Diffusion 3, Sec. 3.1)."""
        if sampler == "logit_normal":
            return torch.sigmoid(torch.randn(n, generator=generator, device=device, dtype=torch.float64))
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)

    def snr(self, s: torch.Tensor) -> torch.Tensor:
        """((1 - s) / s)^2 of a (B,) tensor of s, float64 (B,): infinite at the data."""
        return ((1 - s.double()) / s.double()) ** 2

    def time_density(self, s: torch.Tensor, sampler: str = "uniform") -> torch.Tensor:
        """The density of ``training_times(sampler=sampler)`` at s in (0, 1), float64: 1, or the logit-normal's
        exp(-logit(s)^2 / 2) / (sqrt(2 pi) s (1 - s))."""
        s = s.double()
        if sampler == "logit_normal":
            return torch.exp(-(torch.logit(s) ** 2) / 2) / (math.sqrt(2 * math.pi) * s * (1 - s))
        return torch.ones_like(s)

    def to(self, device: torch.device | str) -> LinearFlow:
        """The same path: it holds no tensors."""
        return self

    def export(self) -> dict:
        """A "uniform" grid: a grid of k steps takes [t, alpha, sigma] at u = i / k (i = 0 ... k) on the straight line
        from the ``noise`` end to the ``data`` end, each with the input scale 1 / sqrt(alpha^2 + sigma^2)."""
        return {"name": self.name, "grid": "uniform", "noise": list(self.point(1.0)), "data": list(self.point(0.0))}

    def input_scale(self, p: GridPoint) -> float:
        """1 / sqrt(alpha^2 + sigma^2): x_t at about unit variance for data of unit variance, as on the VP path."""
        return 1 / (p.alpha * p.alpha + p.sigma * p.sigma) ** 0.5  # floats or tensors alike


PATHS = {VP.name: VP, LinearFlow.name: LinearFlow}  # a DiffusionConfig's path names one of these
GaussianPath = VP | LinearFlow  # any of them, for type hints
