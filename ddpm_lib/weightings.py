"""How much each noise level counts in the training loss, in one table: a weighting is a function of the SNR.

Every objective here is the same per-level denoising loss with another weight (Kingma & Gao 2023, "Understanding
diffusion objectives"). At a level of signal-to-noise ratio SNR = alpha^2 / sigma^2, a network's error in its own
target is ``scale`` times its error in x0, ``scale`` = |target error|^2 / |x0 error|^2 (the parametrization's
``x0_error_scale2``: SNR for eps, 1 for x0). A weighting gives the weight on the target's squared error from
(snr, scale, gamma), all (B,) tensors but gamma:

* ``min_snr``: min(SNR, gamma) on the x0 error (Hang et al. 2023, Eq. 8), min(SNR, gamma) / scale on the target's;
* ``uniform``: 1, L_simple in the network's own parametrization (Ho et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WEIGHTINGS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "min_snr": lambda snr, scale, gamma: snr.clamp(max=gamma) / scale,
    "uniform": lambda snr, scale, gamma: torch.ones_like(snr),
}
LOSS_WEIGHTINGS = tuple(WEIGHTINGS)
