"""The reverse process: DDPM ancestral sampling (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021).

``ddpm_step`` and ``ddim_step`` take one step from x_t toward the data at 0-based int timesteps of a
schedule (the notebooks' form); ``ddim_update`` is DDIM's step between two grid points of any path
(:mod:`ddpm_lib.paths`). ``sample_loop`` runs a solver (:mod:`ddpm_lib.solvers`) over a denoiser
(:mod:`ddpm_lib.denoiser`) on the grid of the denoiser's path and yields every step, and everything else
(``sample``, the widgets, the GIF export, the CLI) consumes it. Images are (B, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .diffusion import eps_from_x0, q_posterior, x0_from_eps
from .paths import VP, GridPoint
from .schedules import NoiseSchedule, extract

VARIANCES = ("beta_tilde", "beta")


class StepOutput(NamedTuple):
    x_prev: torch.Tensor  # x_{t-1}, (B, C, H, W)
    x0: torch.Tensor  # the predicted clean image, (B, C, H, W)


class SamplerStep(NamedTuple):
    index: int  # the step's place in the grid: 0 at pure noise, len(grid) - 1 for the finished sample
    point: GridPoint  # where x_t is: its time and noise levels (the data, sigma = 0, for the finished sample)
    x_t: torch.Tensor  # the latent at the point, (B, C, H, W); the finished sample at the last index
    x0: torch.Tensor  # the model's prediction of the clean image from x_t (equal to x_t for the finished sample)

    @property
    def t(self):
        """The point's time: on the VP path the 0-based timestep, -1 for the finished sample."""
        return self.point.t


def ddpm_step(
    x_t: torch.Tensor,
    t: int,
    eps: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    variance: str = "beta_tilde",
    clip_x0: bool = True,
) -> StepOutput:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (Alg. 2, line 4).

    ``eps`` is the predicted noise for x_t; ``noise`` is the z of Alg. 2 (drawn with
    ``torch.randn_like`` when not given) and is ignored at t = 0, where no noise is added.
    """
    # 1. predict x0 from eps (Eq. 15); clipping to the data range [-1, 1] keeps samples stable
    x0 = x0_from_eps(x_t, t, eps, schedule)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    return StepOutput(ddpm_update(x_t, t, x0, schedule, noise, variance), x0)


def ddpm_update(
    x_t: torch.Tensor, t: int, x0: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None, variance: str = "beta_tilde"
) -> torch.Tensor:
    """x_{t-1} drawn from q(x_{t-1} | x_t, x0) with the step variance ``variance``: :func:`ddpm_step` once x0 is predicted."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid choices: {', '.join(VARIANCES)}")
    # 2. mean of the posterior q(x_{t-1} | x_t, x0) (Eq. 7); without clipping it equals Eq. 11
    mean, posterior_variance = q_posterior(x0, x_t, t, schedule)
    # 3. no noise on the last step (Alg. 2: z = 0 if t = 1, our t = 0)
    if t == 0:
        return mean
    # 4. sigma_t^2 = beta_t or beta tilde_t (Sec. 3.2), then x_{t-1} = mean + sigma_t z
    sigma2 = extract(schedule.betas, t, x_t.shape) if variance == "beta" else posterior_variance
    if noise is None:
        noise = torch.randn_like(x_t)
    return mean + sigma2.sqrt() * noise


def ddim_step(
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eps: torch.Tensor,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
) -> StepOutput:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12), t_prev < t; t_prev = -1 means the data.

    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the DDPM step with variance beta tilde.
    """
    if not -1 <= t_prev < t:
        raise ValueError(f"DDIM needs -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
    # 1. predict x0 (Eq. 12, "predicted x0"); after clipping, re-derive the eps it implies
    x0 = x0_from_eps(x_t, t, eps, schedule)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x_t, t, x0, schedule)
    path = VP(schedule)
    return StepOutput(ddim_update(path.point(t), path.point(t_prev), x0, eps, eta, noise), x0)


def ddim_update(
    p: GridPoint, p_next: GridPoint, x0: torch.Tensor, eps: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """x at ``p_next`` from the predicted x0 and eps at ``p`` (Eq. 12 on any path): :func:`ddim_step` once both are predicted.

    With a = alpha^2 and 1 - a = sigma^2 on the VP path, this is Eq. 12 term for term.
    """
    # 2. sigma(eta) (Eq. 16): eta times the standard deviation of q(x_next | x_t, x0)
    sigma = 0.0 if eta == 0 else eta * p_next.sigma * max(1 - (p.alpha * p_next.sigma) ** 2 / (p_next.alpha * p.sigma) ** 2, 0.0) ** 0.5
    # 3. the "direction pointing to x_t" (Eq. 12)
    direction = max(p_next.sigma**2 - sigma**2, 0.0) ** 0.5 * eps
    x_next = p_next.alpha * x0 + direction
    # 4. random noise, when eta > 0
    if sigma > 0:
        x_next = x_next + sigma * (torch.randn_like(x0) if noise is None else noise)
    return x_next


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with ``model`` in eval mode (dropout off), then restore the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def sample_loop(
    denoiser,
    shape: tuple[int, ...],
    solver,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Run the reverse process from x_T ~ N(0, I) with ``solver``, yielding a :class:`SamplerStep` at every step.

    ``denoiser`` predicts x0 and eps at (x_t, p) (a :class:`ddpm_lib.denoiser.Denoiser`, possibly
    guided or clipped); ``solver`` is one of :data:`ddpm_lib.solvers.SOLVERS`, run over its grid of the
    denoiser's path. Yields (index, point, x_t, predicted x0) for each point it visits, from pure noise
    down, then a last item at the data holding the finished sample. ``shape`` is (B, C, H, W). All
    randomness (x_T and any noise the solver adds) comes from ``generator`` and is drawn on the
    generator's device, so the same seed gives the same images; pass ``x_T`` to fix the start instead.
    """
    device = denoiser.device

    def noise() -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device)

    x = x_T.to(device) if x_T is not None else noise()
    yield from solver(denoiser, x, solver.grid(denoiser.path), noise)


class DegenerateModelError(ValueError):
    """A model that can only draw blank or broken images: its predictions or its finished samples are
    non-finite, absurdly large or constant (a run that blew up, or a network that learned nothing)."""


OUTPUT_LIMIT = 100.0  # the largest RMS a sound prediction has: eps, x0 and v all have an RMS of about 1.4 at most


@torch.inference_mode()
def check_network(denoiser, chw: tuple[int, int, int]) -> None:
    """Raise :class:`DegenerateModelError` unless ``denoiser``'s network makes usable predictions, before a long run.

    The network sees four draws of pure noise (seed 0, its own generator) at the first, the middle and the
    last point before the data of its path's default grid (on the VP path t = T-1, about T/2 and 0), without
    labels. Its predictions must be finite, have an RMS of at most
    :data:`OUTPUT_LIMIT` and differ between inputs: a blown-up run predicts 1e29, an all-zero head
    the same 0 for every input, and either would draw black or noise images.
    """
    x = torch.randn((4, *chw), generator=torch.Generator().manual_seed(0)).to(denoiser.device)  # (4, C, H, W)
    grid = denoiser.path.grid()
    for p in (grid[0], grid[len(grid) // 2], grid[-2]):
        t = p.t
        out = denoiser.output(x, p)  # (4, C, H, W)
        rms = out.double().square().mean().sqrt().item()  # float64: float32 squares overflow from 1e19
        if not math.isfinite(rms):
            raise DegenerateModelError(f"the network's predictions at t={t} are NaN or infinite; the training run blew up")
        if rms > OUTPUT_LIMIT:
            raise DegenerateModelError(
                f"the network's predictions at t={t} have an RMS of {rms:.3g}, where a sound model's are about 1; "
                "the training run blew up (use an earlier checkpoint or snapshot)"
            )
        if out.amax() == out.amin():
            raise DegenerateModelError(f"the network predicts the same value for every input at t={t}; it has not learned anything")


def check_samples(x: torch.Tensor) -> torch.Tensor:
    """``x``, the finished samples (B, C, H, W) in [-1, 1], if they are images; a :class:`DegenerateModelError`
    if any is non-finite, or every one is flat (a single grey level, such as all black)."""
    if not torch.isfinite(x).all():
        raise DegenerateModelError(f"{(~torch.isfinite(x)).flatten(1).any(1).sum().item()} of the {len(x)} samples hold NaN or inf")
    flat = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) < 1 / 127.5  # less than one grey level apart
    if flat.all():
        raise DegenerateModelError(f"all {len(x)} samples are flat images of one grey level; the model draws nothing")
    return x


def check_trajectory(steps: Iterable[SamplerStep]) -> Iterator[SamplerStep]:
    """``steps`` as they come, with :func:`check_samples` applied to the finished samples (at the data) before they are yielded."""
    for step in steps:
        if step.point.sigma == 0:
            check_samples(step.x_t)
        yield step


def sample(denoiser, shape: tuple[int, ...], solver, **kwargs) -> torch.Tensor:
    """The finished samples of :func:`sample_loop` (same arguments), shape (B, C, H, W), in [-1, 1] when clipped."""
    (last,) = deque(sample_loop(denoiser, shape, solver, **kwargs), maxlen=1)  # keeps only the last step
    return last.x_t
