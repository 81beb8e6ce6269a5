"""Pictures: image grids, GIFs of the reverse process, and timestep-slider widgets.

Images come in as (B, C, H, W) floats in [-1, 1] and go out as uint8 arrays of shape (H, W)
for one channel or (H, W, 3) for three. The widgets only need ipywidgets (imported when a widget is made, so the
rest runs without it), not a display: set ``viewer.slider.value`` and ``viewer.frame`` and
``viewer.image`` update. Shown in a notebook, every viewer also carries a kernel-free version of
itself (see :mod:`ddpm_lib.scrubber`) for readers without a kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from .diffusion import q_posterior, q_sample
from .files import write_atomic
from .sampling import SamplerStep
from .schedules import NoiseSchedule
from .scrubber import OUTPUT_BUDGET, encoded_size, fit_frames, scrubber_html

MAX_SCRUB_FRAMES = 201  # a kernel-free scrubber's frames at most, however many fit its budget


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 255] uint8, same shape."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile a batch (B, C, H, W) in [-1, 1] into one uint8 image, ``nrow`` images a row
    (default: a square), each pixel repeated ``scale`` times in both directions."""
    from torchvision.utils import make_grid  # imported here: torchvision is slow to import (see ddpm_lib.data)

    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(to_uint8(x.cpu()), nrow=nrow, padding=padding, pad_value=255)  # (3, H', W') uint8
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    grid = grid.permute(1, 2, 0).numpy()  # (H', W', 3)
    return grid[..., 0].copy() if x.shape[1] == 1 else grid


def _common_channels(images: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """The images as they are if all are grayscale (H, W), else all as RGB (H, W, 3)."""
    if all(img.ndim == 2 for img in images):
        return list(images)
    return [np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for img in images]


def beside(*images: np.ndarray, gap: int = 8) -> np.ndarray:
    """Join images left to right with a white gap, padding shorter ones with white at the bottom."""
    images = _common_channels(images)
    height = max(img.shape[0] for img in images)
    parts = []
    for img in images:
        pad = [(0, height - img.shape[0]), (0, 0)] + [(0, 0)] * (img.ndim - 2)
        parts += [np.pad(img, pad, constant_values=255), np.full((height, gap, *img.shape[2:]), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def stack(*images: np.ndarray, gap: int = 8) -> np.ndarray:
    """Join images top to bottom with a white gap, padding narrower ones with white on the right."""
    images = _common_channels(images)
    width = max(img.shape[1] for img in images)
    parts = []
    for img in images:
        pad = [(0, 0), (0, width - img.shape[1])] + [(0, 0)] * (img.ndim - 2)
        parts += [np.pad(img, pad, constant_values=255), np.full((gap, width, *img.shape[2:]), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=0)


class CurvePanel:
    """Line plots drawn once with matplotlib; ``render(x)`` returns them as an RGB array with a
    marker at x on every line, fast enough for a slider (no matplotlib work per update).

    ``curves`` maps a panel title to {line label: y values over ``x``}.
    """

    def __init__(self, x: Sequence[float], curves: dict[str, dict[str, Sequence[float]]], xlabel: str = "t", dpi: int = 80):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.x = np.asarray(x, dtype=float)
        fig = Figure(figsize=(3.4 * len(curves), 2.4), dpi=dpi, layout="constrained")
        canvas = FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(curves), squeeze=False)[0]
        for ax, (title, lines) in zip(axes, curves.items(), strict=True):
            for label, y in lines.items():
                ax.plot(self.x, np.asarray(y, dtype=float), label=label or None)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            if len(lines) > 1:
                ax.legend(fontsize="small")
        canvas.draw()
        self.base = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        h = self.base.shape[0]
        self.dots = []  # (len(x), 2) pixel (column, row) of every point of every line
        self.columns = []  # per panel: (top row, bottom row, pixel column of every x)
        for ax, lines in zip(axes, curves.values(), strict=True):
            for y in lines.values():
                xy = ax.transData.transform(np.c_[self.x, np.asarray(y, dtype=float)])
                self.dots.append(np.c_[xy[:, 0], h - xy[:, 1]].round().astype(int))
            _, y0, _, y1 = ax.bbox.extents
            cols = ax.transData.transform(np.c_[self.x, np.zeros_like(self.x)])[:, 0].round().astype(int)
            self.columns.append((int(h - y1), int(h - y0), cols))

    def render(self, x: float) -> np.ndarray:
        i = int(np.abs(self.x - x).argmin())
        img = self.base.copy()
        for top, bottom, cols in self.columns:  # a thin grey line across each panel
            img[top:bottom, cols[i] : cols[i] + 1] = (190, 190, 190)
        for dots in self.dots:  # a red dot on each curve
            c, r = dots[i]
            img[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4] = (214, 39, 40)
        return img


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write a batch (B, C, H, W) in [-1, 1] as a PNG grid, atomically."""
    return write_atomic(path, iio.imwrite("<bytes>", image_grid(x, nrow), extension=".png"))


def frame_indices(n: int, frames: int, ease: float = 1.0) -> list[int]:
    """Up to ``frames`` distinct, increasing indices into n items, always the first and the last.

    ``ease = 1`` spaces them evenly; ``ease > 1`` crowds them toward the end: frame k of K sits at
    (n - 1) * (1 - (1 - k / (K - 1)) ** ease), nudged apart where two would coincide.
    """
    if n < 1 or frames < 1:
        raise ValueError(f"need at least one item and one frame, got n={n}, frames={frames}")
    if ease < 1:
        raise ValueError(f"ease must be >= 1 (1: evenly spaced), got {ease}")
    k = min(frames, n)
    if k == 1:
        return [n - 1]
    idx = [round((n - 1) * (1 - (1 - i / (k - 1)) ** ease)) for i in range(k)]
    for i in range(1, k):  # at least one apart going forward ...
        idx[i] = max(idx[i], idx[i - 1] + 1)
    for i in range(k - 1, -1, -1):  # ... and room left for the rest going back (n >= k, so this fits)
        idx[i] = min(idx[i], n - k + i)
    return idx


def check_levels(levels: int) -> None:
    """Reject a grey-level count that a uint8 image cannot hold."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be between 2 and 256, got {levels}")


def posterize(image: np.ndarray, levels: int) -> np.ndarray:
    """A uint8 image with its values rounded to ``levels`` evenly spaced grey levels (2 ... 256, 256: unchanged)."""
    check_levels(levels)
    step = 255 / (levels - 1)
    return np.round(np.round(image / step) * step).astype(np.uint8)


def trajectory_frame(step: SamplerStep, nrow: int | None = None, scale: int = 1, show_x0: bool = True) -> np.ndarray:
    """One picture of a sampler step: the grid of x_t, and beside it the predicted x0."""
    grid = image_grid(step.x_t, nrow, scale=scale)
    return beside(grid, image_grid(step.x0, nrow, scale=scale)) if show_x0 else grid


def auto_scale(image_size: int, nrow: int, target: int = 200) -> int:
    """The integer upscaling that makes a grid of ``nrow`` images at least ``target`` pixels wide."""
    return max(1, math.ceil(target / (nrow * (image_size + 2))))


def save_trajectory_gif(
    steps: Iterable[SamplerStep],
    path: str | os.PathLike,
    num_steps: int | None = None,
    frames: int = 60,
    duration_ms: int = 80,
    hold_ms: int = 1500,
    loop: int = 0,
    scale: int | None = None,
    nrow: int | None = None,
    show_x0: bool = True,
    ease: float = 2.0,
    levels: int = 32,
) -> Path:
    """Write the reverse diffusion as an animated GIF, atomically.

    ``steps`` is what :func:`sampling.sample_loop` yields (a list, or the live generator with
    ``num_steps`` = how many items it will yield); ``frames`` of them become frames of
    ``duration_ms`` each, the last held for ``hold_ms``. ``loop=0`` loops forever. The frames crowd
    toward the end of the trajectory, where the digits form (``ease``, see :func:`frame_indices`;
    1 spaces them evenly); the noisy early frames are also the ones that compress worst.
    Small images are upscaled (nearest neighbour) by ``scale``, by default to >= 200 px a grid.
    Pixels are rounded to ``levels`` grey levels (see :func:`posterize`): GIF's LZW compression
    barely shrinks noise at 256 levels, and 32 keep a 64-digit GIF of a 1000-step run at about
    half the size with no banding visible in MNIST digits; 256 keeps every value.
    """
    if num_steps is None:
        if not isinstance(steps, Sequence):
            raise ValueError("pass num_steps when steps is an iterator")
        num_steps = len(steps)
    keep = set(frame_indices(num_steps, frames, ease))
    check_levels(levels)  # before the sampler runs
    images = []
    for i, step in enumerate(steps):
        if i in keep:
            rows = nrow or math.ceil(math.sqrt(len(step.x_t)))
            s = scale or auto_scale(step.x_t.shape[-1], rows)
            images.append(posterize(trajectory_frame(step, rows, s, show_x0), levels))
    if not images:
        raise ValueError("the trajectory is empty")
    durations = [duration_ms] * (len(images) - 1) + [max(duration_ms, hold_ms)]
    images, durations = merge_repeats(images, durations)
    if len(images) == 1:  # one frame (--frames 1, or all alike): Pillow writes a still image and takes one duration
        return write_atomic(path, iio.imwrite("<bytes>", images[0], extension=".gif", duration=durations[0], loop=loop))
    return write_atomic(path, iio.imwrite("<bytes>", np.stack(images), extension=".gif", duration=durations, loop=loop))


GIF_MAX_MS = 655_350  # the longest a GIF frame can show: its delay is a 16-bit count of hundredths of a second


def merge_repeats(images: list[np.ndarray], durations: list[int]) -> tuple[list[np.ndarray], list[int]]:
    """Runs of identical frames as one frame shown for their summed duration, at most :data:`GIF_MAX_MS`.

    The GIF writer merges such runs itself, and its 16-bit delay then overflows (OverflowError)
    where long frames repeat; the last frames of a trajectory often do once posterized.
    """
    kept, shown = [images[0]], [durations[0]]
    for image, ms in zip(images[1:], durations[1:], strict=True):
        if np.array_equal(image, kept[-1]):
            shown[-1] += ms
        else:
            kept.append(image)
            shown.append(ms)
    return kept, [min(ms, GIF_MAX_MS) for ms in shown]


def png_bytes(image: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", image, extension=".png")


def webp_bytes(image: np.ndarray) -> bytes:
    """Lossless WebP: the same pixels as the PNG in about half the bytes (grey noise and plots), for a
    kernel-free scrubber's frames; every browser of the last five years shows it."""
    return iio.imwrite("<bytes>", image, extension=".webp", lossless=True, quality=100, method=2)


def caption(image: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """``image`` (uint8, grey or RGB) with a white strip above it that carries ``text`` in black."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    strip = Image.new("RGB", (rgb.shape[1], height), "white")
    ImageDraw.Draw(strip).text((4, 3), text, fill="black", font=ImageFont.load_default(size=height - 8))
    return np.concatenate([np.asarray(strip), rgb], axis=0)


class TimestepViewer:
    """An ipywidgets slider over the timestep t and the picture ``render(t)`` for it.

    ``render`` maps a 0-based t to a uint8 image. Moving the slider (or setting
    ``viewer.slider.value`` in code) re-renders: ``viewer.frame`` holds the array and
    ``viewer.image`` the PNG shown. The slider's bounds clamp out-of-range values.
    ``scrub_ts`` are the t the kernel-free version may offer (default: every slider value); it
    keeps as many of them, evenly spaced, as fit its ``budget`` of characters in the notebook.
    """

    def __init__(
        self,
        render: Callable[[int], np.ndarray],
        t_min: int,
        t_max: int,
        step: int = 1,
        value: int | None = None,
        description: str = "t",
        static_ts: Sequence[int] | None = None,
        label: Callable[[int], str] | None = None,
        scrub_ts: Sequence[int] | None = None,
        budget: int = OUTPUT_BUDGET,
    ):
        import ipywidgets as widgets

        self.render = render
        self.description = description
        self.static_ts = list(static_ts) if static_ts is not None else [t_max, (t_min + t_max) // 2, t_min]
        self.scrub_ts = sorted(scrub_ts) if scrub_ts is not None else list(range(t_min, t_max + 1, step))
        self.label = label or (lambda t: f"{description} = {t}")  # the caption of each static frame
        self.budget = budget  # characters the kernel-free version may take in the notebook
        self.slider = widgets.IntSlider(
            value=t_max if value is None else value, min=t_min, max=t_max, step=step, description=description, continuous_update=True
        )
        self.image = widgets.Image(format="png")
        self.widget = widgets.VBox([self.slider, self.image])
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        self.show(self.slider.value)

    def show(self, t: int) -> None:
        self.t = t
        self.frame = self.render(t)
        self.image.value = png_bytes(self.frame)

    def static_image(self) -> np.ndarray:
        """What the slider would show at each of ``static_ts``, each captioned with ``label(t)``, stacked top to bottom."""
        return stack(*(caption(self.render(t), self.label(t)) for t in self.static_ts), gap=16)

    def kernel_free_html(self, budget: int | None = None) -> str:
        """The scrubber for readers without a kernel (see :mod:`ddpm_lib.scrubber`): the static picture,
        and the frames at as many of ``scrub_ts`` as fit in ``budget`` characters with it (None: the viewer's)."""
        budget = self.budget if budget is None else budget
        static = png_bytes(self.static_image())
        room = budget - encoded_size(len(static)) - 8_000  # the script, the labels and the JSON around the frames
        frames = fit_frames(self.scrub_ts, lambda t: webp_bytes(self.render(t)), room, MAX_SCRUB_FRAMES)
        ts = list(frames)
        start = min(range(len(ts)), key=lambda i: abs(ts[i] - self.slider.value))
        shown = ", ".join(str(t) for t in self.static_ts)
        text = f"A static picture at {self.description} = {shown}. Run the notebook, or read it on the course site, to move the slider."
        return scrubber_html({self.description: ts}, {(i,): frames[t] for i, t in enumerate(ts)}, (start,), static, text)

    def _repr_mimebundle_(self, **kwargs):
        # The live widget for JupyterLab, and the kernel-free scrubber (with its static picture) for the rest.
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.kernel_free_html()
        return bundle


def forward_viewer(
    x0: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None, nrow: int | None = None, scale: int = 2
) -> TimestepViewer:
    """Scrub q(x_t | x0): the grid shows ``q_sample(x0, t, schedule, noise)`` with fixed noise."""
    noise = torch.randn_like(x0) if noise is None else noise
    return TimestepViewer(lambda t: image_grid(q_sample(x0, t, schedule, noise), nrow, scale=scale), 0, schedule.T - 1, value=0)


FORMING = (-0.713, 0.324, 1.072, 1.737)  # lambda = log(alpha / sigma) where MNIST digits form: the linear schedule's t = 400, 200, 100, 50


def nearest_steps(steps: Sequence[SamplerStep], lams: Sequence[float]) -> list[int]:
    """The indices of the steps whose noise levels lambda = log(alpha / sigma) are nearest each of ``lams``."""
    return [min(range(len(steps)), key=lambda i: abs(steps[i].point.lam - lam)) for lam in lams]


def trajectory_viewer(
    steps: Sequence[SamplerStep], nrow: int | None = None, scale: int = 2, show_x0: bool = True, budget: int = OUTPUT_BUDGET
) -> TimestepViewer:
    """Scrub a stored reverse trajectory by its step index: x_t and the predicted x0 at each point of the grid.

    The last step shows the finished sample. The static picture shows pure noise, the steps nearest the
    noise levels :data:`FORMING` and the sample, on any path and grid; the kernel-free version's frames
    crowd toward the end of the run, where the digits form, as the GIF's do.
    """
    steps = list(steps)
    last = len(steps) - 1
    frames: dict[int, np.ndarray] = {}  # rendered once, then instant

    def render(i: int) -> np.ndarray:
        if i not in frames:
            frames[i] = trajectory_frame(steps[i], nrow, scale, show_x0)
        return frames[i]

    def label(i: int) -> str:
        return f"step {i}: the finished samples" if i == last else f"step {i}, t = {steps[i].t:g} (left: x_t, right: the predicted x0)"

    static = sorted({0, *nearest_steps(steps, FORMING), last})
    crowded = frame_indices(len(steps), MAX_SCRUB_FRAMES, ease=2.0)
    return TimestepViewer(render, 0, last, value=0, description="step", static_ts=static, label=label, scrub_ts=crowded, budget=budget)


def forward_explorer(x0: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None, scale: int = 2) -> TimestepViewer:
    """Scrub q(x_t | x0) for a row of images: x_t, the fixed noise eps it mixes in, and a marker
    moving along the alpha_bar_t and log-SNR curves."""
    noise = torch.randn_like(x0) if noise is None else noise
    t = np.arange(schedule.T)
    panel = CurvePanel(t, {"alpha_bar_t": {"": schedule.alpha_bar.cpu()}, "log SNR": {"": schedule.snr.log().cpu()}})
    noise_row = image_grid(noise, len(noise), scale=scale)

    def render(t: int) -> np.ndarray:
        return beside(stack(image_grid(q_sample(x0, t, schedule, noise), len(x0), scale=scale), noise_row), panel.render(t))

    return TimestepViewer(
        render,
        0,
        schedule.T - 1,
        value=0,
        static_ts=[0, schedule.T // 10, schedule.T // 4, schedule.T // 2, schedule.T - 1],
        label=lambda t: f"t = {t} (top: x_t, below: the noise eps it mixes in)",
    )


def posterior_explorer(x0: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None, scale: int = 3) -> TimestepViewer:
    """Scrub one step back with x0 known: for images x0 (B, C, H, W), the rows x_t, the posterior mean of
    q(x_{t-1} | x_t, x0) (Eq. 7) and one draw of x_{t-1} from it, beside the mean's two weights and the
    variances beta_t and beta tilde_t along t."""
    g = torch.Generator().manual_seed(0)
    noise, z = (torch.randn(x0.shape, generator=g) if noise is None else noise), torch.randn(x0.shape, generator=g)
    weights = {"weight of x0": schedule.posterior_mean_coef1.cpu(), "weight of x_t": schedule.posterior_mean_coef2.cpu()}
    variances = {"beta_t": schedule.betas.log10().cpu(), "beta tilde_t": schedule.posterior_log_variance_clipped.cpu() / math.log(10)}
    panel = CurvePanel(np.arange(schedule.T), {"posterior mean weights": weights, "log10 variance": variances})

    def render(t: int) -> np.ndarray:
        x_t = q_sample(x0, t, schedule, noise)
        mean, variance = q_posterior(x0, x_t, t, schedule)
        rows = [image_grid(row, len(x0), scale=scale) for row in (x_t, mean, mean + variance.sqrt() * z)]
        return beside(stack(*rows), panel.render(t))

    return TimestepViewer(
        render,
        0,
        schedule.T - 1,
        value=schedule.T // 2,
        static_ts=[1, schedule.T // 10, schedule.T // 2, schedule.T - 1],
        label=lambda t: f"t = {t} (rows: x_t, the posterior mean, a draw of x_(t-1))",
    )


def schedule_explorer(
    x0: torch.Tensor, schedules: dict[str, NoiseSchedule], noise: torch.Tensor | None = None, scale: int = 3
) -> TimestepViewer:
    """Scrub t for one image (1, C, H, W) under several schedules of the same T at once, with the
    same noise: one image per schedule, and a marker on each schedule's alpha_bar curve."""
    T = {s.T for s in schedules.values()}
    if len(T) != 1:
        raise ValueError(f"the schedules must share T, got {sorted(T)}")
    T = T.pop()
    noise = torch.randn_like(x0) if noise is None else noise
    panel = CurvePanel(np.arange(T), {"alpha_bar_t": {name: s.alpha_bar.cpu() for name, s in schedules.items()}})

    def render(t: int) -> np.ndarray:
        row = torch.cat([q_sample(x0, t, s, noise) for s in schedules.values()])
        return beside(image_grid(row, len(row), scale=scale), panel.render(t))

    names = ", ".join(schedules)
    return TimestepViewer(
        render, 0, T - 1, value=0, static_ts=[0, T // 4, T // 2, 3 * T // 4, T - 1], label=lambda t: f"t = {t}: {names}, left to right"
    )


class GuidanceViewer:
    """A digit picker and a guidance-strength slider over precomputed sample grids.

    ``grids[(digit, strength)]`` is a (B, C, H, W) tensor in [-1, 1] of samples asked to be
    ``digit`` at that strength, drawn from the same noise for every strength. Every grid is
    encoded to PNG once, up front, so moving a control only swaps bytes. ``viewer.picker.value``
    and ``viewer.slider.value`` may be set in code; ``viewer.frame`` holds the array shown.
    Where scripts cannot run the viewer shows ``static_digits`` at every strength, each row captioned.
    """

    def __init__(
        self,
        grids: dict[tuple[int, float], torch.Tensor],
        description: str = "w",
        nrow: int | None = None,
        scale: int = 2,
        static_digits: Sequence[int] = (3,),
    ):
        import ipywidgets as widgets

        self.digits = sorted({d for d, _ in grids})
        self.strengths = sorted({s for _, s in grids})
        self.description, self.static_digits = description, list(static_digits)
        self.frames = {key: image_grid(x, nrow, scale=scale) for key, x in grids.items()}
        self.pngs = {key: png_bytes(frame) for key, frame in self.frames.items()}
        self.picker = widgets.ToggleButtons(options=self.digits, value=self.digits[0], description="digit", style={"button_width": "32px"})
        self.slider = widgets.SelectionSlider(options=self.strengths, value=self.strengths[0], description=description)
        self.image = widgets.Image(format="png")
        self.widget = widgets.VBox([self.picker, self.slider, self.image])
        for control in (self.picker, self.slider):
            control.observe(lambda change: self.show(), names="value")
        self.show()

    def show(self) -> None:
        key = (self.picker.value, self.slider.value)
        self.frame = self.frames[key]
        self.image.value = self.pngs[key]

    def static_image(self) -> np.ndarray:
        """Each of ``static_digits`` at every strength, captioned, side by side in a row per strength."""
        rows = [beside(*(self.frames[(d, s)] for d in self.static_digits)) for s in self.strengths]
        digits = ", ".join(map(str, self.static_digits))
        captioned = [caption(row, f"digit {digits}, {self.description} = {s:g}") for row, s in zip(rows, self.strengths, strict=True)]
        return stack(*captioned, gap=12)

    def kernel_free_html(self, budget: int = OUTPUT_BUDGET) -> str:
        """The scrubber for readers without a kernel (see :mod:`ddpm_lib.scrubber`): a range input
        over the digits, one over the strengths, every grid, and the static picture."""
        static = png_bytes(self.static_image())
        size = encoded_size(len(static)) + sum(encoded_size(len(png)) for png in self.pngs.values())
        if size > budget:
            raise ValueError(f"the grids take {size:,} characters, over the budget of {budget:,}: use fewer samples or a smaller scale")
        frames = {(i, j): self.pngs[(d, s)] for i, d in enumerate(self.digits) for j, s in enumerate(self.strengths)}
        start = (self.digits.index(self.picker.value), self.strengths.index(self.slider.value))
        digits = ", ".join(map(str, self.static_digits))
        text = f"A static picture of digit {digits} at every {self.description}. Run the notebook, or read it on the course site, to pick."
        return scrubber_html({"digit": self.digits, self.description: self.strengths}, frames, start, static, text, image_format="png")

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.kernel_free_html()
        return bundle
