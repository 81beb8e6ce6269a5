"""Reference solutions to the notebooks' exercises, written as a reader would write them.

They live here, not in the notebooks, so that a notebook read on GitHub does not print the answer
under its exercise: the notebook calls ``exercises.reveal(solution, check)``, which runs the
checker (so CI proves every solution right) and shows the source folded until the reader opens it.
The library's own versions (``q_sample``, ``timestep_embedding``, ...) are the originals the
checkers compare against. Conventions as in the exercises: 0-based t, pixels in [-1, 1].
"""

from __future__ import annotations

import torch

from .paths import GridPoint
from .schedules import NoiseSchedule, extract


def q_sample_solution(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    alpha_bar = extract(schedule.alpha_bar, t, x0.shape)  # (B, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # Eq. 4


def alpha_bar_solution(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas, dim=0)  # (T,)


def posterior_mean_solution(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    a, a_bar = extract(schedule.alphas, t, x0.shape), extract(schedule.alpha_bar, t, x0.shape)
    a_bar_prev, beta = extract(schedule.alpha_bar_prev, t, x0.shape), extract(schedule.betas, t, x0.shape)
    return a_bar_prev.sqrt() * beta / (1 - a_bar) * x0 + a.sqrt() * (1 - a_bar_prev) / (1 - a_bar) * x_t  # Eq. 7


def timestep_embedding_solution(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = 10000 ** (-torch.arange(half) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=1)  # (B, dim)


def loss_simple_solution(
    model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    alpha_bar = extract(schedule.alpha_bar, t, x0.shape)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    return ((noise - model(x_t, t)) ** 2).mean()  # Eq. 14


def ddpm_step_solution(x_t: torch.Tensor, t: int, eps: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    beta, alpha, alpha_bar = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bar[t].item()
    mean = (x_t - beta / (1 - alpha_bar) ** 0.5 * eps) / alpha**0.5  # Eq. 11
    if t == 0:
        return mean
    return mean + schedule.posterior_variance[t].sqrt().item() * noise


def ddim_step_solution(
    x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, schedule: NoiseSchedule, eta: float, noise: torch.Tensor
) -> torch.Tensor:
    a, a_prev = schedule.alpha_bar[t].item(), schedule.alpha_bar[t_prev].item()
    x0 = ((x_t - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
    eps = (x_t - a**0.5 * x0) / (1 - a) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5  # Eq. 16
    return a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps + sigma * noise  # Eq. 12


def frechet_distance_solution(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    eigenvalues = torch.linalg.eigvals(sigma_a @ sigma_b).real.clamp(min=0)
    return (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * eigenvalues.sqrt().sum()


def guided_eps_solution(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float, schedule) -> torch.Tensor:
    null = torch.full_like(y, model.config.num_classes)  # the "no label" class
    cond, uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)  # one batched pass
    return (1 + w) * cond - w * uncond  # Ho & Salimans, Eq. 6


def heun_step_solution(denoiser, x_t: torch.Tensor, p: GridPoint, p_next: GridPoint) -> torch.Tensor:
    s, s_next = p.sigma / p.alpha, p_next.sigma / p_next.alpha  # sigma~ = sigma / alpha
    x = x_t / p.alpha  # x~ = x / alpha
    eps = denoiser(x_t, p).eps
    euler = x + (s_next - s) * eps  # Euler's step, in x~
    eps_end = denoiser(p_next.alpha * euler, p_next).eps  # the slope where it lands (back in x_t's scale)
    return p_next.alpha * (x + (s_next - s) * (eps + eps_end) / 2)  # the trapezoid rule, then x = alpha x~


def flow_matching_loss_solution(model, x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    s = s[:, None]  # (B, 1): one time per point
    x_s = (1 - s) * x0 + s * eps  # the straight line from the data (s = 0) to the noise (s = 1)
    velocity = eps - x0  # its derivative d x_s / ds, the regression target
    return (model(x_s, s[:, 0]) - velocity).square().mean()
