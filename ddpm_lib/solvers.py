"""Solvers: the ways from x_T to a sample, each over a grid of timesteps and seeing only a denoiser.

A solver is a small frozen object: ``timesteps(T)`` gives its grid (0-based t, high to low), and
calling it with a denoiser (:mod:`ddpm_lib.denoiser`), x_T and a noise source yields a
:class:`~ddpm_lib.sampling.SamplerStep` at every visited t, then the finished sample at t = -1.
A multistep solver keeps its history in the generator itself. ``sampling.sample_loop`` runs any
of them; guidance and clipping arrive already folded into the denoiser.

With alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), the probability-flow ODE of
the forward process is, in x~ = x_t / alpha_t and sigma~ = sigma_t / alpha_t, simply
dx~ / dsigma~ = eps(x_t, t) (Song et al. 2021, DDIM Eq. 14): deterministic DDIM is Euler's
method on it, :class:`Heun` the trapezoidal correction of Euler (Karras et al. 2022, Alg. 1), and
:class:`DPMSolverPP2M` integrates its linear part exactly in lambda = log(alpha / sigma) with the
data prediction x0 extrapolated from two steps (Lu et al. 2022, DPM-Solver++, Alg. 2), and
:class:`DPMSolverPP3M` from three: orders 1, 2, 2 and 3. :class:`DPMSolverPP3MPublished` is 3M as
diffusers and the DPM-Solver code have it, whose second-derivative term is half the Taylor expansion's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .diffusion import x0_from_eps
from .sampling import VARIANCES, SamplerStep, ddim_timesteps, ddim_update, ddpm_update
from .schedules import NoiseSchedule

Noise = Callable[[], torch.Tensor]  # draws fresh N(0, I) noise shaped like x_t


def trailing_grid(T: int, steps: int | None) -> list[int]:
    return ddim_timesteps(T, steps or T)


@dataclass(frozen=True)
class DDPM:
    """Ancestral sampling (Ho et al. 2020, Alg. 2): all T steps, each adding noise of variance beta tilde or beta."""

    variance: str = "beta_tilde"  # sigma_t^2 of each step: the posterior's beta tilde_t, or beta_t (Sec. 3.2)
    steps: int | None = None  # DDPM always visits all T; a number other than T is refused by timesteps()

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; valid choices: {', '.join(VARIANCES)}")

    def timesteps(self, T: int) -> list[int]:
        if self.steps not in (None, T):
            raise ValueError(f"DDPM visits all T={T} steps; use the ddim, heun, dpmpp2m or dpmpp3m solver for {self.steps} steps")
        return list(range(T - 1, -1, -1))

    def evaluations(self, T: int) -> int:
        return T

    def __call__(self, denoiser, x: torch.Tensor, timesteps: list[int], noise: Noise) -> Iterator[SamplerStep]:
        for t in timesteps:
            pred = denoiser(x, t)
            x_prev = ddpm_update(x, t, pred.x0, denoiser.schedule, noise() if t > 0 else None, self.variance)
            yield SamplerStep(t, x, pred.x0)
            x = x_prev
        yield SamplerStep(-1, x, x)


@dataclass(frozen=True)
class DDIM:
    """DDIM (Song et al. 2021, Eq. 12) over ``steps`` trailing timesteps; eta = 0 is deterministic, 1 DDPM-like."""

    steps: int | None = None  # None: all T
    eta: float = 0.0  # the noise scale of Eq. 16

    def __post_init__(self) -> None:
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")

    def timesteps(self, T: int) -> list[int]:
        return trailing_grid(T, self.steps)

    def evaluations(self, T: int) -> int:
        return len(self.timesteps(T))

    def __call__(self, denoiser, x: torch.Tensor, timesteps: list[int], noise: Noise) -> Iterator[SamplerStep]:
        for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
            pred = denoiser(x, t)
            x_prev = ddim_update(x, t, t_prev, pred.x0, pred.eps, denoiser.schedule, self.eta, noise() if self.eta > 0 else None)
            yield SamplerStep(t, x, pred.x0)
            x = x_prev
        yield SamplerStep(-1, x, x)


@dataclass(frozen=True)
class Heun:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn): second order.

    Each step takes DDIM's Euler step to t_prev, evaluates eps there, and repeats the step from x_t
    with the mean of the two eps (the trapezoidal rule). The last step, to the data, is Euler's
    alone, so ``steps`` steps cost 2 steps - 1 network evaluations.
    """

    steps: int | None = None  # None: all T

    def timesteps(self, T: int) -> list[int]:
        return trailing_grid(T, self.steps)

    def evaluations(self, T: int) -> int:
        return 2 * len(self.timesteps(T)) - 1

    def __call__(self, denoiser, x: torch.Tensor, timesteps: list[int], noise: Noise) -> Iterator[SamplerStep]:
        schedule = denoiser.schedule
        for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
            pred = denoiser(x, t)
            euler = ddim_update(x, t, t_prev, pred.x0, pred.eps, schedule)  # 1. predictor: Euler, dx~ = eps dsigma~
            yield SamplerStep(t, x, pred.x0)
            if t_prev < 0:
                x = euler
                continue
            eps = (pred.eps + denoiser(euler, t_prev).eps) / 2  # 2. the mean of the slopes at both ends
            x = ddim_update(x, t, t_prev, x0_from_eps(x, t, eps, schedule), eps, schedule)  # 3. trapezoidal corrector
        yield SamplerStep(-1, x, x)


def lambda_alpha_sigma(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """(lambda_t, alpha_t, sigma_t) at 0-based t, in float64; t = -1 is the data: (inf, 1, 0)."""
    if t < 0:
        return math.inf, 1.0, 0.0
    a_bar = schedule.alpha_bar[t].item()
    alpha, sigma = math.sqrt(a_bar), math.sqrt(1 - a_bar)
    return math.log(alpha / sigma), alpha, sigma


@dataclass(frozen=True)
class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second order from one network evaluation a step.

    In lambda = log(alpha / sigma) the ODE's linear part is solved exactly, and the data prediction
    x0 along the step is a polynomial in lambda through the last ``order`` predictions. Order 1 is
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x - alpha_{t_i} (e^{-h_i} - 1) x0_{i-1}, h_i = lambda_{t_i} - lambda_{t_{i-1}}
    (deterministic DDIM again); order 2 adds the slope (x0_{i-1} - x0_{i-2}) / r_i with r_i = h_{i-1} / h_i
    (Alg. 2, line 6). The first step has no history and is first order; the last step, to the data
    (lambda = inf), returns the last x0 prediction (first order, as diffusers' default).
    """

    steps: int | None = None  # None: all T
    order: ClassVar[int] = 2  # the polynomial's degree + 1 once the history allows it
    second_derivative: ClassVar[float] = 1.0  # the weight of the h^2 x0'' term (order 3 only): 1 is the Taylor expansion's

    def timesteps(self, T: int) -> list[int]:
        return trailing_grid(T, self.steps)

    def evaluations(self, T: int) -> int:
        return len(self.timesteps(T))

    def step_order(self, i: int, num_steps: int) -> int:
        """The order of step i (0-based) of num_steps: limited by the history, and lowered near the end."""
        return min(self.order, i + 1)

    def __call__(self, denoiser, x: torch.Tensor, timesteps: list[int], noise: Noise) -> Iterator[SamplerStep]:
        schedule = denoiser.schedule
        x0s, lams = [], []  # the x0 predictions and their lambdas so far, newest last (the multistep history)
        for i, (t, t_next) in enumerate(zip(timesteps, [*timesteps[1:], -1], strict=True)):
            pred = denoiser(x, t)
            yield SamplerStep(t, x, pred.x0)
            lam, _, sigma = lambda_alpha_sigma(schedule, t)
            x0s, lams = [*x0s[-2:], pred.x0], [*lams[-2:], lam]
            if t_next < 0:  # to the data: e^{-h} = 0 and sigma_next = 0 leave x0 (first order)
                x = pred.x0
                break
            lam_next, alpha_next, sigma_next = lambda_alpha_sigma(schedule, t_next)
            order = self.step_order(i, len(timesteps))
            x = (sigma_next / sigma) * x + multistep_update(x0s, lams, lam_next, alpha_next, order, self.second_derivative)
        yield SamplerStep(-1, x, x)


@dataclass(frozen=True)
class DPMSolverPP3M(DPMSolverPP2M):
    """DPM-Solver++(3M): the same exact linear part with x0 quadratic in lambda through the last three
    predictions (Lu et al. 2022, App. B), one network evaluation a step, and third order.

    It starts at order 1, then 2, then 3; with fewer than 15 steps the second-to-last step drops to
    order 2 (as diffusers' ``lower_order_final``), where a large last h makes the extrapolation unstable.
    Its second-derivative term is the one the Taylor expansion of the step's integral asks for: twice
    the published update's (:class:`DPMSolverPP3MPublished`).
    """

    order: ClassVar[int] = 3

    def step_order(self, i: int, num_steps: int) -> int:
        lowered = 2 if num_steps < 15 and i == num_steps - 2 else self.order
        return min(lowered, i + 1)


@dataclass(frozen=True)
class DPMSolverPP3MPublished(DPMSolverPP3M):
    """DPM-Solver++(3M) as diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` and the original
    DPM-Solver code take it: the h^2 x0'' term at half its weight, which leaves the solver second order.

    Kept to compare with them and to measure what the corrected :class:`DPMSolverPP3M` changes.
    """

    second_derivative: ClassVar[float] = 0.5  # their D2 = (D1_0 - D1_1) / (r0 + r1) is about h^2 x0'' / 2, weighted as h^2 x0''


def multistep_update(
    x0s: list[torch.Tensor], lams: list[float], lam_next: float, alpha_next: float, order: int, second_derivative: float = 1.0
) -> torch.Tensor:
    """The data-prediction part of a DPM-Solver++ step of ``order`` 1, 2 or 3 from lams[-1] to lam_next.

    The step's exact answer is alpha_next times the integral over u in [0, h] of e^{u - h} x0(lams[-1] + u),
    h = lam_next - lams[-1]. With x0 expanded to second order, x0 + u x0' + u^2 x0'' / 2, and phi_1 = e^{-h} - 1,
    the integral is -phi_1 x0 + (h + phi_1) x0' + (h^2 / 2 - h - phi_1) x0''. In D0 = x0, D1 ~ h x0' and
    D2 ~ h^2 x0'' from the history: order 1 is -alpha phi_1 D0; order 2 adds -alpha phi_1 D1 / 2 (Lu et al.
    2022, Alg. 2); order 3 adds alpha (phi_1 / h + 1) D1 + alpha (1/2 - (phi_1 + h) / h^2) D2, with D2 scaled
    by ``second_derivative`` (0.5: the published update, see :class:`DPMSolverPP3MPublished`).
    """
    h = lam_next - lams[-1]
    phi1 = math.expm1(-h)
    m0 = x0s[-1]
    update = -alpha_next * phi1 * m0
    if order == 2:
        r0 = (lams[-1] - lams[-2]) / h
        update = update - 0.5 * alpha_next * phi1 * (m0 - x0s[-2]) / r0
    elif order == 3:
        r0, r1 = (lams[-1] - lams[-2]) / h, (lams[-2] - lams[-3]) / h  # the last two steps, in units of h
        d1_0, d1_1 = (m0 - x0s[-2]) / r0, (x0s[-2] - x0s[-3]) / r1  # h x0' at the middles of the last two steps
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # h x0' at lams[-1]
        d2 = 2 * second_derivative * (d1_0 - d1_1) / (r0 + r1)  # h^2 x0''
        update = update + alpha_next * (phi1 / h + 1) * d1 + alpha_next * (0.5 - (phi1 + h) / h**2) * d2
    return update


SOLVERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "heun": Heun,
    "dpmpp2m": DPMSolverPP2M,
    "dpmpp3m": DPMSolverPP3M,
    "dpmpp3m-published": DPMSolverPP3MPublished,
}


def make_solver(name: str, **options) -> DDPM | DDIM | Heun | DPMSolverPP2M:
    """The solver called ``name`` (one of :data:`SOLVERS`) with its ``options`` (steps, eta, variance).

    An option the solver does not have is refused unless it is None, so that e.g. an eta meant for
    DDIM is never silently dropped.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid choices: {', '.join(SOLVERS)}")
    cls = SOLVERS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(k for k, v in options.items() if k not in fields and v is not None)
    if foreign:
        raise ValueError(f"the {name} solver takes {', '.join(sorted(fields))}, not {', '.join(foreign)}")
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})
