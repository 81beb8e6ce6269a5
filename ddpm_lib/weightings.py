"""How much each noise level counts in the training loss, in one table: a weighting is a function of the SNR.

Every objective here is the same per-level denoising loss with another weight (Kingma & Gao 2023, "Understanding
diffusion objectives"). At a level of signal-to-noise ratio SNR = alpha^2 / sigma^2, a network's error in its own
target is ``scale`` times its error in x0, ``scale`` = |target error|^2 / |x0 error|^2 (the parametrization's
``x0_error_scale2``: SNR for eps, 1 for x0). A weighting gives the weight on the target's squared error from
(snr, scale, gamma), all (B,) tensors but gamma:

* ``min_snr``: min(SNR, gamma) on the x0 error (Hang et al. 2023, Eq. 8), min(SNR, gamma) / scale on the target's;
* ``uniform``: 1, L_simple in the network's own parametrization (Ho et al. 2020).

:func:`implied_weight` puts any objective (a path, its times' sampler, a parametrization and a weighting) on Kingma &
Gao's common axis: the weight w(lambda) that the objective gives the eps error at each log-SNR.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .parametrizations import PARAMETRIZATIONS

WEIGHTINGS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "min_snr": lambda snr, scale, gamma: snr.clamp(max=gamma) / scale,
    "uniform": lambda snr, scale, gamma: torch.ones_like(snr),
}
LOSS_WEIGHTINGS = tuple(WEIGHTINGS)


def loss_weights(path, times: torch.Tensor, prediction: str, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """The (B,) float32 weights of the per-image losses at a (B,) tensor of the path's training ``times``: ``weighting``
    of each time's SNR and of how ``prediction``'s error scales with the x0 error there."""
    p, snr = path.points(times, times.shape), path.snr(times).float()
    return WEIGHTINGS[weighting](snr, PARAMETRIZATIONS[prediction].x0_error_scale2(snr, p.alpha, p.sigma), gamma)


def implied_weight(
    path, times: torch.Tensor, prediction: str, weighting: str, sampler: str = "uniform", gamma: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda, w) at the training ``times`` (an increasing (N,) grid of the path's times): lambda = log(alpha / sigma),
    and w(lambda), the weight the objective gives E|eps_hat - eps|^2 per unit of lambda, scaled to a largest value of 1.

    Every objective here is E_t[W_t |target error|^2], and |target error|^2 = (scale / SNR) |eps error|^2, so it is
    the integral over lambda of p(t) |dt/dlambda| W_t scale / SNR |eps error|^2: that factor is w(lambda) (Kingma &
    Gao 2023, Eq. 7, whose lambda is twice this one). L_simple on eps gives w = |dt/dlambda| p(t); flow matching
    (velocity, uniform weights and times on the linear path) w proportional to e^(-lambda). dt/dlambda is taken by
    finite differences along ``times``.
    """
    p, snr = path.points(times, times.shape), path.snr(times)
    scale = PARAMETRIZATIONS[prediction].x0_error_scale2(snr, p.alpha.double(), p.sigma.double())
    eps_weight = WEIGHTINGS[weighting](snr, scale, gamma) * scale / snr  # the weight on |eps error|^2 at each time
    lam = snr.log() / 2
    (dlam_dt,) = torch.gradient(lam, spacing=(times.double(),))
    w = path.time_density(times, sampler) * eps_weight / dlam_dt.abs()
    return lam, w / w.max()
