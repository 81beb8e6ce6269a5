"""Pictures of the 2-D toy (ddpm_lib.toy): its diffused density, a denoiser's field, particles flowing along it.

:func:`field_viewer` is notebook 9's slider: at each step of a reverse trajectory, for each denoiser side by
side, the exact density q(x_t) in grey bands, a field of arrows at grid points x_t (scaled so that the longest
spans one grid cell), and the particles of the trajectory at that step. The field is a function of the
denoiser's prediction: :func:`pull` (notebook 9's) or :func:`velocity` (notebook 10's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .denoiser import Prediction
from .paths import GridPoint
from .sampling import SamplerStep
from .toy import Mixture, vp_level
from .viz import TimestepViewer, nearest_steps

LIMIT = 2.2  # the pictures show [-LIMIT, LIMIT]^2
Field = Callable[[Prediction, torch.Tensor, GridPoint], torch.Tensor]  # (prediction at x, x (N, 2), point) -> arrows (N, 2)


def pull(pred: Prediction, x: torch.Tensor, p: GridPoint) -> torch.Tensor:
    """alpha_t E[x0 | x_t] - x_t: where the denoiser pulls x_t, sigma_t^2 times the score on the VP path."""
    return p.alpha * pred.x0 - x


def velocity(pred: Prediction, x: torch.Tensor, p: GridPoint) -> torch.Tensor:
    """E[x0 | x_t] - E[eps | x_t]: minus the velocity of the linear flow, the way its ODE moves x_t toward the data."""
    return pred.x0 - pred.eps


def field_frame(
    mixture: Mixture,
    denoisers: dict[str, object],
    particles: dict[str, torch.Tensor],
    point: GridPoint,
    field: Field = pull,
    arrows: int = 13,
    dpi: int = 80,
) -> np.ndarray:
    """One frame (H, W, 3) uint8: a panel per denoiser (its name as title) at ``point`` with its ``field``, and
    ``particles[name]`` (N, 2)."""
    c, a = vp_level(point)  # q(x_t) is q_VP(c x_t) at alpha_bar = a, up to a constant factor
    fig = Figure(figsize=(4 * len(denoisers), 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    side = torch.linspace(-LIMIT, LIMIT, 121, dtype=torch.float64)
    density = mixture.log_prob(c * torch.cartesian_prod(side, side), a).exp().reshape(121, 121).T  # (y, x)
    grid = torch.linspace(-LIMIT * 0.93, LIMIT * 0.93, arrows, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)  # (arrows^2, 2)
    spacing = (grid[1] - grid[0]).item()
    for i, (name, denoiser) in enumerate(denoisers.items()):
        ax = fig.add_subplot(1, len(denoisers), i + 1)
        levels = density.max().item() * torch.tensor([0.02, 0.1, 0.3, 0.6, 1.0001]).numpy()  # a few flat bands compress well
        ax.contourf(side.numpy(), side.numpy(), density.numpy(), levels=levels, cmap="Greys", antialiased=False)
        with torch.no_grad():
            pred = denoiser(points.to(torch.float32), point)
        vectors = field(Prediction(pred.eps.double(), pred.x0.double()), points, point)  # (arrows^2, 2)
        scale = vectors.norm(dim=1).max().item() / spacing  # the longest arrow spans one grid cell
        ax.quiver(*points.T, *vectors.T, angles="xy", scale_units="xy", scale=scale, color="tab:blue", width=0.005, antialiased=False)
        if name in particles:
            p = particles[name]
            ax.scatter(p[:, 0], p[:, 1], s=4, color="tab:red")
        ax.set(xlim=(-LIMIT, LIMIT), ylim=(-LIMIT, LIMIT), xticks=[], yticks=[], aspect="equal")
        ax.set_title(f"{name}, t = {point.t:g}", fontsize=13)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def field_viewer(
    mixture: Mixture,
    denoisers: dict[str, object],
    trajectories: dict[str, Sequence[SamplerStep]],
    field: Field = pull,
    budget: int = 500_000,
) -> TimestepViewer:
    """A slider over the steps of the trajectories (trajectories[name] from sample_loop with denoisers[name], all on
    one grid) showing :func:`field_frame` with ``field`` at each step's point, with each trajectory's x_t there as its
    particles.

    The static picture: pure noise, the steps nearest lambda = log(alpha / sigma) = 0.65 and 1.42 (the course's
    linear schedule at t = 150 and 70: a ring forming, modes forming), and the last step before the data."""
    by_name = {name: list(steps)[:-1] for name, steps in trajectories.items()}  # the finished samples are the last x_t's modes
    steps = next(iter(by_name.values()))
    last = len(steps) - 1

    def render(i: int) -> np.ndarray:
        return field_frame(mixture, denoisers, {name: s[i].x_t for name, s in by_name.items()}, steps[i].point, field)

    label = "step {}: the density, the field and the ODE's particles".format
    static = sorted({0, *nearest_steps(steps, (0.65, 1.42)), last})
    return TimestepViewer(render, 0, last, value=0, description="step", static_ts=static, label=label, budget=budget)
