"""What a network predicts, in one table: eps, x0, v or the flow velocity, each read on any path.

At a point (alpha, sigma) of a path (:mod:`ddpm_lib.paths`), x_t = alpha x0 + sigma eps ties the four together:

=========  =====================================  ==========================================================
name       the network learns                     x0 from its output
=========  =====================================  ==========================================================
eps        eps (Ho et al. 2020)                   (x_t - sigma eps) / alpha (Eq. 15)
x0         x0                                     the output
v          alpha eps - sigma x0 (Salimans & Ho)   (alpha x_t - sigma v) / (alpha^2 + sigma^2)
velocity   eps - x0 (flow matching, rectified)    (x_t - sigma u) / (alpha + sigma)
=========  =====================================  ==========================================================

and eps = (x_t - alpha x0) / sigma from any x0. On the linear flow path (alpha = 1 - s, sigma = s) the
velocity eps - x0 is dx_s/ds, the field whose ODE carries noise to data. eps cannot give x0 where alpha = 0
(the linear flow's first point): :class:`~ddpm_lib.diffusion.DiffusionConfig` refuses that pair.

``alpha`` and ``sigma`` are floats (a grid point) or tensors that broadcast against x_t (a training batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

Tensor = torch.Tensor


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha (Ho et al. Eq. 15 on any path)."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha, sigma) -> Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


class Parametrization(NamedTuple):
    learns: str  # what the network's output means, in words
    target: Callable  # (x0, eps, alpha, sigma) -> what the network is trained to output
    to_eps_x0: Callable  # (output, x_t, alpha, sigma) -> (eps, x0)
    x0_error_scale2: Callable  # (snr, alpha, sigma) -> |target error|^2 / |x0 error|^2 at fixed x_t (see ddpm_lib.weightings)


def _eps_x0_from_x0(x0: Tensor, x_t: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
    return eps_from_x0(x_t, x0, alpha, sigma), x0


PARAMETRIZATIONS = {
    "eps": Parametrization(
        "the noise eps (Ho et al. 2020)",
        lambda x0, eps, alpha, sigma: eps,
        lambda out, x_t, alpha, sigma: (out, x0_from_eps(x_t, out, alpha, sigma)),
        lambda snr, alpha, sigma: snr,  # eps error = -(alpha / sigma) x0 error
    ),
    "x0": Parametrization(
        "the clean image x0", lambda x0, eps, alpha, sigma: x0, _eps_x0_from_x0, lambda snr, alpha, sigma: torch.ones_like(snr)
    ),
    "v": Parametrization(
        "v = alpha eps - sigma x0 (Salimans & Ho 2022)",
        lambda x0, eps, alpha, sigma: alpha * eps - sigma * x0,
        lambda out, x_t, alpha, sigma: _eps_x0_from_x0((alpha * x_t - sigma * out) / (alpha * alpha + sigma * sigma), x_t, alpha, sigma),
        lambda snr, alpha, sigma: (alpha * alpha + sigma * sigma) ** 2 / (sigma * sigma),  # SNR + 1 on the VP path
    ),
    "velocity": Parametrization(
        "the flow velocity eps - x0 (Lipman et al. 2023; Liu et al. 2023)",
        lambda x0, eps, alpha, sigma: eps - x0,
        lambda out, x_t, alpha, sigma: _eps_x0_from_x0((x_t - sigma * out) / (alpha + sigma), x_t, alpha, sigma),
        lambda snr, alpha, sigma: (alpha + sigma) ** 2 / (sigma * sigma),
    ),
}
PREDICTIONS = tuple(PARAMETRIZATIONS)


def check_prediction(name: str) -> None:
    """Refuse a name that is not in :data:`PARAMETRIZATIONS`, listing the valid ones."""
    if name not in PARAMETRIZATIONS:
        raise ValueError(f"unknown prediction {name!r}; valid choices: {', '.join(PREDICTIONS)}")
