"""A small MLP noise predictor for points in the plane: the U-Net's role for the 2-D toy (ddpm_lib.toy).

It predicts eps (or whatever the run's DiffusionConfig.prediction names) for points x_t (B, 2) at
0-based timesteps t (B,), from x_t and the sinusoidal embedding of t that the U-Net uses.
:class:`~ddpm_lib.training.Trainer` trains it like a U-Net, with the same loss and loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .unet import timestep_embedding

LIMITS = {"dim": 64, "hidden": 4096, "depth": 16, "time_dim": 1024}


@dataclass(frozen=True)
class MLPConfig:
    dim: int = 2  # coordinates of a point
    hidden: int = 128  # width of every hidden layer
    depth: int = 3  # hidden layers
    time_dim: int = 32  # size of the sinusoidal embedding of t (even)
    num_classes: int = 0  # always 0: the toy is unconditional (Trainer reads it)

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            if not isinstance(getattr(self, name), int) or not 1 <= getattr(self, name) <= limit:
                raise ValueError(f"{name} must be a whole number from 1 to {limit:,}, got {getattr(self, name)!r}")
        if self.time_dim % 2:
            raise ValueError(f"time_dim must be even, got {self.time_dim}")
        if self.num_classes != 0:
            raise ValueError("the MLP is unconditional: num_classes must be 0")


class MLP(nn.Module):
    """[x_t, embedding(t)] -> Linear -> SiLU, ``depth`` times -> Linear to ``dim`` outputs."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = [config.dim + config.time_dim] + [config.hidden] * config.depth
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(width_in, width_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], config.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, dim) points; t: (B,) 0-based timesteps. Returns (B, dim)."""
        emb = timestep_embedding(t, self.config.time_dim).to(x.dtype)  # (B, time_dim)
        return self.net(torch.cat([x, emb], dim=1))
