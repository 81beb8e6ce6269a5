"""Pictures of the 2-D toy (ddpm_lib.toy): its diffused density, a denoiser's field, particles flowing along it.

:func:`field_viewer` is notebook 9's slider: at each 0-based t, for each denoiser side by side, the
exact density q(x_t) in grey bands, arrows from grid points x_t toward sqrt(alpha_bar_t) E[x0 | x_t]
(the score times 1 - alpha_bar_t, scaled so that the longest spans one grid cell), and the particles
of a reverse trajectory at t.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .sampling import SamplerStep
from .toy import Mixture
from .viz import TimestepViewer

LIMIT = 2.2  # the pictures show [-LIMIT, LIMIT]^2


def field_frame(
    mixture: Mixture, denoisers: dict[str, object], particles: dict[str, torch.Tensor], t: int, arrows: int = 13, dpi: int = 80
) -> np.ndarray:
    """One frame (H, W, 3) uint8: a panel per denoiser (its name as title) at 0-based t, with ``particles[name]`` (N, 2)."""
    schedule = next(iter(denoisers.values())).schedule
    a = schedule.alpha_bar[t].item()
    fig = Figure(figsize=(4 * len(denoisers), 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    side = torch.linspace(-LIMIT, LIMIT, 121, dtype=torch.float64)
    density = mixture.log_prob(torch.cartesian_prod(side, side), a).exp().reshape(121, 121).T  # (y, x)
    grid = torch.linspace(-LIMIT * 0.93, LIMIT * 0.93, arrows, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)  # (arrows^2, 2)
    spacing = (grid[1] - grid[0]).item()
    for i, (name, denoiser) in enumerate(denoisers.items()):
        ax = fig.add_subplot(1, len(denoisers), i + 1)
        levels = density.max().item() * torch.tensor([0.02, 0.1, 0.3, 0.6, 1.0001]).numpy()  # a few flat bands compress well
        ax.contourf(side.numpy(), side.numpy(), density.numpy(), levels=levels, cmap="Greys", antialiased=False)
        with torch.no_grad():
            x0 = denoiser(points.to(torch.float32), t).x0.double()
        pull = a**0.5 * x0 - points  # (1 - a) * score
        scale = pull.norm(dim=1).max().item() / spacing  # the longest arrow spans one grid cell
        ax.quiver(*points.T, *pull.T, angles="xy", scale_units="xy", scale=scale, color="tab:blue", width=0.005, antialiased=False)
        if name in particles:
            p = particles[name]
            ax.scatter(p[:, 0], p[:, 1], s=4, color="tab:red")
        ax.set(xlim=(-LIMIT, LIMIT), ylim=(-LIMIT, LIMIT), xticks=[], yticks=[], aspect="equal")
        ax.set_title(f"{name}, t = {t}", fontsize=13)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def field_viewer(
    mixture: Mixture, denoisers: dict[str, object], trajectories: dict[str, Sequence[SamplerStep]], budget: int = 500_000
) -> TimestepViewer:
    """A t slider over :func:`field_frame`; the particles are each trajectory's x_t at the visited t nearest the
    slider (trajectories[name] from sample_loop with denoisers[name]; the same grid for all)."""
    by_t = {name: {s.t: s.x_t for s in steps if s.t >= 0} for name, steps in trajectories.items()}
    ts = sorted(next(iter(by_t.values())))

    def nearest(t: int) -> int:
        return min(ts, key=lambda s: abs(s - t))

    def render(t: int) -> np.ndarray:
        at = nearest(t)
        return field_frame(mixture, denoisers, {name: steps[at] for name, steps in by_t.items()}, at)

    label = "t = {}: the density, the field and the ODE's particles".format
    static = sorted({nearest(t) for t in (ts[-1], 150, 70, ts[0])}, reverse=True)  # noise, a ring forming, modes forming, data
    return TimestepViewer(render, ts[0], ts[-1], value=ts[-1], static_ts=static, label=label, scrub_ts=ts, budget=budget)
