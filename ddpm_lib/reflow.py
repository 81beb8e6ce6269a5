"""Reflow (Liu et al. 2023, "Flow straight and fast", Alg. 1): straighten a flow by training on its own pairs.

A flow trained on independent pairs (noise z, data x0) learns the marginal velocity E[z - x0 | x_s], which
averages over every pair whose straight line passes through x_s; so its ODE paths curve, and a solver
needs many steps. Push fresh noise through that ODE and keep the pairs (z, x0 = ODE(z)): they are a
coupling of the same two distributions, and a second flow trained on them (x_s = (1 - s) x0 + s z, the
same loss, :meth:`~ddpm_lib.training.Trainer.train_step` with the pair's noise) sees lines that cross far
less, so its paths are straighter. A straight path is solved exactly by one Euler step.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .sampling import sample
from .solvers import Solver


def ode_pairs(denoiser, noise: torch.Tensor, solver: Solver, batch_size: int = 1000) -> TensorDataset:
    """The coupling of ``noise`` (N, ...) with where the denoiser's ODE carries it: a dataset of (x0, y, noise)
    triples, y all 0 (unlabelled), that :class:`~ddpm_lib.training.Trainer` trains on as they are paired.

    ``solver`` should be deterministic (DDIM with eta 0, Heun, DPM-Solver++), so that each x0 is a function of
    its noise; x0 is computed in ``batch_size`` pieces, without gradients, in the noise's dtype."""
    with torch.no_grad():
        x0 = torch.cat([sample(denoiser, z.shape, solver, x_T=z) for z in noise.split(batch_size)])  # (N, ...)
    return TensorDataset(x0, torch.zeros(len(noise), dtype=torch.long), noise)
