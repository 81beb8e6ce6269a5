"""Solvers: the ways from x_T to a sample, each over a grid of points and seeing only a denoiser.

A solver is a small frozen object: ``grid(path)`` gives its grid of :class:`~ddpm_lib.paths.GridPoint`
from pure noise down to the data, and calling it with a denoiser (:mod:`ddpm_lib.denoiser`), x_T, that grid
and a noise source yields a :class:`~ddpm_lib.sampling.SamplerStep` at every point but the last, then the
finished sample at the data. A multistep solver keeps its history in the generator itself.
``sampling.sample_loop`` runs any of them; guidance and clipping arrive already folded into the denoiser.
A solver reads alpha, sigma and lambda = log(alpha / sigma) from the points, so it runs on any path, and
:func:`register` adds one to :data:`SOLVERS`, which the CLI, docs/cli.md and the browser page list.

With x_t = alpha x0 + sigma eps, the probability-flow ODE is, in x~ = x_t / alpha and sigma~ = sigma / alpha,
simply dx~ / dsigma~ = eps(x_t, t) (Song et al. 2021, DDIM Eq. 14): deterministic DDIM is Euler's
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

from .parametrizations import x0_from_eps
from .paths import VP, GaussianPath, GridPoint
from .sampling import VARIANCES, SamplerStep, ddim_update, ddpm_update

Noise = Callable[[], torch.Tensor]  # draws fresh N(0, I) noise shaped like x_t
SOLVERS: dict[str, type] = {}  # name -> solver class, in the order the CLI lists them


def register(cls: type) -> type:
    """Add a solver class to :data:`SOLVERS` under its ``name``: the CLI's --sampler, docs/cli.md and the browser's menu follow."""
    SOLVERS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Solver:
    """What every solver has: ``steps`` over the trailing grid of the path, one network evaluation a step."""

    steps: int | None = None  # None: the path's default (VP: all T)
    name: ClassVar[str]  # the CLI's --sampler
    title: ClassVar[str]  # its name in prose, tables and the browser's menu
    summary: ClassVar[str]  # one line for the CLI's help and docs/cli.md
    in_browser: ClassVar[bool] = False  # whether the site's live sampler (scripts/site_sampler/worker.js) has it too

    def grid(self, path: GaussianPath) -> list[GridPoint]:
        """The points this solver visits on ``path``, from pure noise to the data (steps + 1 of them)."""
        return path.grid(self.steps)

    def evaluations(self, path: GaussianPath) -> int:
        """Network evaluations per image on ``path``."""
        return len(self.grid(path)) - 1

    def label(self, path: GaussianPath) -> str:
        """How tables name this solver on ``path``: its title and steps, "Heun 25", "DPM-Solver++(3M) 10"."""
        return f"{self.title} {len(self.grid(path)) - 1}"

    def __call__(self, denoiser, x: torch.Tensor, grid: list[GridPoint], noise: Noise) -> Iterator[SamplerStep]:
        raise NotImplementedError


@register
@dataclass(frozen=True)
class DDPM(Solver):
    """Ancestral sampling (Ho et al. 2020, Alg. 2): all T steps, each adding noise of variance beta tilde or beta.

    It needs the betas of a VP path's schedule, so it runs on the VP path alone."""

    variance: str = "beta_tilde"  # sigma_t^2 of each step: the posterior's beta tilde_t, or beta_t (Sec. 3.2)
    name: ClassVar[str] = "ddpm"
    title: ClassVar[str] = "DDPM"
    summary: ClassVar[str] = "ancestral sampling over all T steps (Ho et al.), on the VP path only; --variance beta_tilde or beta"

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; valid choices: {', '.join(VARIANCES)}")

    def grid(self, path: GaussianPath) -> list[GridPoint]:
        others = ", ".join(name for name in SOLVERS if name != self.name)
        if not isinstance(path, VP):
            raise ValueError(f"ddpm's ancestral steps need the betas of the VP path; this model's path is {path.name}: use one of {others}")
        if self.steps not in (None, path.schedule.T):
            raise ValueError(f"DDPM visits all T={path.schedule.T} steps; use one of {others} for {self.steps} steps")
        return path.grid()

    def label(self, path: GaussianPath) -> str:
        return f"{super().label(path)}, var {self.variance}"  # "DDPM 1000, var beta_tilde"

    def __call__(self, denoiser, x: torch.Tensor, grid: list[GridPoint], noise: Noise) -> Iterator[SamplerStep]:
        schedule = denoiser.path.schedule
        for i, p in enumerate(grid[:-1]):
            pred = denoiser(x, p)
            x_prev = ddpm_update(x, p.t, pred.x0, schedule, noise() if p.t > 0 else None, self.variance)
            yield SamplerStep(i, p, x, pred.x0)
            x = x_prev
        yield SamplerStep(len(grid) - 1, grid[-1], x, x)


@register
@dataclass(frozen=True)
class DDIM(Solver):
    """DDIM (Song et al. 2021, Eq. 12) over ``steps`` trailing points; eta = 0 is deterministic (Euler), 1 DDPM-like."""

    eta: float = 0.0  # the noise scale of Eq. 16
    name: ClassVar[str] = "ddim"
    title: ClassVar[str] = "DDIM"
    summary: ClassVar[str] = "Euler on the probability-flow ODE (Song et al.), --steps K; with --eta > 0, noise in each step"
    in_browser: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")

    def label(self, path: GaussianPath) -> str:
        return super().label(path) + (f", eta {self.eta:g}" if self.eta else "")  # "DDIM 50, eta 1"

    def __call__(self, denoiser, x: torch.Tensor, grid: list[GridPoint], noise: Noise) -> Iterator[SamplerStep]:
        for i, (p, p_next) in enumerate(zip(grid, grid[1:], strict=False)):
            pred = denoiser(x, p)
            x_next = ddim_update(p, p_next, pred.x0, pred.eps, self.eta, noise() if self.eta > 0 else None)
            yield SamplerStep(i, p, x, pred.x0)
            x = x_next
        yield SamplerStep(len(grid) - 1, grid[-1], x, x)


@register
@dataclass(frozen=True)
class Heun(Solver):
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn): second order.

    Each step takes DDIM's Euler step to the next point, evaluates eps there, and repeats the step from x_t
    with the mean of the two eps (the trapezoidal rule). The first step, from pure noise, and the last, to the
    data, are Euler's alone: at the first point alpha may be 0 (sigma~ infinite), where the trapezoid has no
    meaning, as at the data sigma is. So ``steps`` steps cost 2 steps - 2 network evaluations (1 for one step).
    """

    name: ClassVar[str] = "heun"
    title: ClassVar[str] = "Heun"
    summary: ClassVar[str] = "second order (Karras et al.), 2K - 2 network evaluations for K steps"

    def evaluations(self, path: GaussianPath) -> int:
        steps = len(self.grid(path)) - 1
        return max(2 * steps - 2, 1)

    def __call__(self, denoiser, x: torch.Tensor, grid: list[GridPoint], noise: Noise) -> Iterator[SamplerStep]:
        for i, (p, p_next) in enumerate(zip(grid, grid[1:], strict=False)):
            pred = denoiser(x, p)
            euler = ddim_update(p, p_next, pred.x0, pred.eps)  # 1. predictor: Euler, dx~ = eps dsigma~
            yield SamplerStep(i, p, x, pred.x0)
            if i == 0 or p_next.sigma == 0:  # from pure noise, or to the data: Euler alone
                x = euler
                continue
            eps = (pred.eps + denoiser(euler, p_next).eps) / 2  # 2. the mean of the slopes at both ends
            x = ddim_update(p, p_next, x0_from_eps(x, eps, p.alpha, p.sigma), eps)  # 3. trapezoidal corrector
        yield SamplerStep(len(grid) - 1, grid[-1], x, x)


@register
@dataclass(frozen=True)
class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second order from one network evaluation a step.

    In lambda = log(alpha / sigma) the ODE's linear part is solved exactly, and the data prediction
    x0 along the step is a polynomial in lambda through the last ``order`` predictions. Order 1 is
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x - alpha_{t_i} (e^{-h_i} - 1) x0_{i-1}, h_i = lambda_{t_i} - lambda_{t_{i-1}}
    (deterministic DDIM again); order 2 adds the slope (x0_{i-1} - x0_{i-2}) / r_i with r_i = h_{i-1} / h_i
    (Alg. 2, line 6). The first step has no history and is first order; the last step, to the data
    (lambda = inf), returns the last x0 prediction (first order, as diffusers' default). Where alpha = 0 at the
    first point (lambda = -inf), the step after it has r = inf and falls to first order by itself.
    """

    order: ClassVar[int] = 2  # the polynomial's degree + 1 once the history allows it
    second_derivative: ClassVar[float] = 1.0  # the weight of the h^2 x0'' term (order 3 only): 1 is the Taylor expansion's
    name: ClassVar[str] = "dpmpp2m"
    title: ClassVar[str] = "DPM-Solver++(2M)"
    summary: ClassVar[str] = "second order (Lu et al.), one network evaluation a step"
    in_browser: ClassVar[bool] = True

    def step_order(self, i: int, num_steps: int) -> int:
        """The order of step i (0-based) of num_steps: limited by the history, and lowered near the end."""
        return min(self.order, i + 1)

    def __call__(self, denoiser, x: torch.Tensor, grid: list[GridPoint], noise: Noise) -> Iterator[SamplerStep]:
        x0s, lams = [], []  # the x0 predictions and their lambdas so far, newest last (the multistep history)
        for i, (p, p_next) in enumerate(zip(grid, grid[1:], strict=False)):
            pred = denoiser(x, p)
            yield SamplerStep(i, p, x, pred.x0)
            x0s, lams = [*x0s[-2:], pred.x0], [*lams[-2:], p.lam]
            if p_next.sigma == 0:  # to the data: e^{-h} = 0 and sigma_next = 0 leave x0 (first order)
                x = pred.x0
                break
            order = self.step_order(i, len(grid) - 1)
            x = (p_next.sigma / p.sigma) * x + multistep_update(x0s, lams, p_next.lam, p_next.alpha, order, self.second_derivative)
        yield SamplerStep(len(grid) - 1, grid[-1], x, x)


@register
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
    name: ClassVar[str] = "dpmpp3m"
    title: ClassVar[str] = "DPM-Solver++(3M)"
    summary: ClassVar[str] = "third order, one network evaluation a step"

    def step_order(self, i: int, num_steps: int) -> int:
        lowered = 2 if num_steps < 15 and i == num_steps - 2 else self.order
        return min(lowered, i + 1)


@register
@dataclass(frozen=True)
class DPMSolverPP3MPublished(DPMSolverPP3M):
    """DPM-Solver++(3M) as diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` and the original
    DPM-Solver code take it: the h^2 x0'' term at half its weight, which leaves the solver second order.

    Kept to compare with them and to measure what the corrected :class:`DPMSolverPP3M` changes.
    """

    second_derivative: ClassVar[float] = 0.5  # their D2 = (D1_0 - D1_1) / (r0 + r1) is about h^2 x0'' / 2, weighted as h^2 x0''
    name: ClassVar[str] = "dpmpp3m-published"
    title: ClassVar[str] = "DPM-Solver++(3M) as published"
    summary: ClassVar[str] = "3M as diffusers and the DPM-Solver code have it: second order, to compare"
    in_browser: ClassVar[bool] = False


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


def solver_table() -> str:
    """:data:`SOLVERS` as the Markdown table docs/cli.md shows (tests/test_packaging.py keeps the two equal)."""
    lines = ["| --sampler | solver | what it is | in the browser |", "|---|---|---|---|"]
    for name, cls in SOLVERS.items():
        lines.append(f"| `{name}` | {cls.title} | {cls.summary} | {'yes' if cls.in_browser else 'no'} |")
    return "\n".join(lines)


def make_solver(name: str, **options) -> Solver:
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
