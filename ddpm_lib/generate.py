"""From a checkpoint and a few choices to images: what ``python -m ddpm_lib sample`` and ``gif`` do, without argparse.

A :class:`SampleRequest` says what to draw; :func:`prepare` checks every choice, loads the model
(and a noisy classifier, for classifier guidance), and refuses a network that cannot sample before
any long work; the :class:`SamplePlan` it returns draws the images in batches of :data:`BATCH`, or
yields the reverse process of all of them for a GIF. Errors are ``ValueError``s whose message names
each field as its command-line flag (``classifier_scale`` is ``--classifier-scale``). Images are
(N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import load_checkpoint, load_model, model_from_state
from .denoiser import Denoiser, guided
from .devices import resolve_device, use_bf16
from .guidance import DEFAULT_CLASSIFIER_SCALE, DEFAULT_GUIDANCE, class_blocks
from .noisy_classifier import check_matches, load_noisy_classifier
from .resources import format_bytes, require
from .sampling import SamplerStep, check_network, check_samples, check_trajectory, sample, sample_loop
from .solvers import DDPM, Solver
from .viz import auto_scale

BATCH = 256  # images the network sees at once: memory stays flat however many are drawn


@dataclass(frozen=True)
class SampleRequest:
    """What to draw, as the CLI's sample and gif take it; None means the default."""

    checkpoint: str  # a checkpoint written by train or export
    num: int = 64  # images to draw
    solver: Solver = DDPM()  # how: any of solvers.SOLVERS with its options (the CLI's --sampler, --steps, --eta, --variance)
    seed: int = 0  # seeds x_T and every step's noise
    device: str | None = None  # cpu, cuda or cuda:N (None: cuda when available)
    precision: str = "auto"  # auto (bf16 where the hardware runs it fast), bf16 or fp32
    label: Sequence[int] | str | None = None  # classes in equal shares, in order; "all"; None: unconditional
    guidance: float | None = None  # classifier-free guidance weight w (None: DEFAULT_GUIDANCE when there are labels)
    classifier: str | None = None  # a noisy classifier to guide toward the labels
    classifier_scale: float | None = None  # its scale s (None: DEFAULT_CLASSIFIER_SCALE)


@dataclass
class SamplePlan:
    """A checked request with its model loaded: ``images()`` or ``trajectory()`` draws it."""

    request: SampleRequest
    denoiser: Denoiser  # unguided; guidance is added per batch, for that batch's labels
    solver: Solver  # the request's
    chw: tuple[int, int, int]  # the images' (C, H, W)
    classes: list[int] | None  # the classes drawn in equal blocks, or None
    guide: dict  # denoiser.guided's guidance, classifier and classifier_scale

    @property
    def num_steps(self) -> int:
        """The steps a trajectory yields: every visited point and the finished sample."""
        return len(self.solver.grid(self.denoiser.path))

    def require_room(self, out: str | os.PathLike, frames: int | None = None, show_x0: bool = True) -> None:
        """Refuse a --num whose samples or output file cannot fit in this machine's memory or disk, before sampling.

        ``out`` is a .png grid or a .npy array of the images, or with ``frames`` a GIF of that many frames (x_t beside
        the predicted x0 when ``show_x0``). Estimates, generous on purpose: the images are kept as float32 and a PNG is
        tiled as a float grid; a GIF keeps every frame, each a grid of --num images upscaled.
        """
        (c, h, w), n, name = self.chw, self.request.num, str(out).lower()
        if frames is None:
            grid = n * (h + 2) * (w + 2) * 3  # make_grid's padded RGB tiling
            memory = 4 * n * c * h * w + (8 * grid if name.endswith(".png") else 0)
            disk = n * c * h * w if name.endswith(".npy") else grid
        else:
            scale = auto_scale(w, math.ceil(math.sqrt(n)))
            frame = n * (h * scale + 2) * (w * scale + 2) * c * (2 if show_x0 else 1)
            frames = min(frames, self.num_steps)
            memory = 16 * n * c * h * w + 3 * frames * frame  # x_t, x0 and eps of every image; every frame, stacked, and encoded
            disk = frames * frame
        require(f"--num {n:,} ({format_bytes(4 * n * c * h * w)} of samples)", memory=memory, disk=disk, out=out)

    def labels(self, start: int, count: int) -> torch.Tensor | None:
        """The (count,) labels of images start ... start + count - 1, or None without labels."""
        if self.classes is None:
            return None
        return class_blocks(self.classes, self.request.num, start, count)

    def images(self) -> torch.Tensor:
        """The request's images (num, C, H, W) on the CPU, in batches of :data:`BATCH`, each from its own x_T.

        Raises :class:`~ddpm_lib.sampling.DegenerateModelError` if they are broken or blank."""
        labels = self.labels(0, self.request.num)
        return check_samples(
            draw_batches(self.denoiser, self.solver, self.chw, self.request.num, self.request.seed, BATCH, labels, **self.guide)
        )

    def trajectory(self) -> Iterator[SamplerStep]:
        """Every step of the reverse process of all num images at once (for a GIF); the finished samples are
        checked before they are yielded."""
        generator = torch.Generator().manual_seed(self.request.seed)
        denoiser = guided(self.denoiser, self.labels(0, self.request.num), **self.guide)
        return check_trajectory(sample_loop(denoiser, (self.request.num, *self.chw), self.solver, generator=generator))


def draw_batches(
    denoiser: Denoiser,
    solver,
    chw: tuple[int, int, int],
    num: int,
    seed: int = 0,
    batch: int = BATCH,
    labels: torch.Tensor | None = None,
    **guide,
) -> torch.Tensor:
    """num images (num, C, H, W) on the CPU drawn with ``solver`` in batches of at most ``batch``, all from one generator
    seeded ``seed``: the one loop over batches. Each batch is guided toward its slice of ``labels`` (num,) with
    ``guide`` (guidance, classifier, classifier_scale), as :func:`~ddpm_lib.denoiser.guided` takes them."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        steered = guided(denoiser, None if labels is None else labels[start : start + n], **guide)
        parts.append(sample(steered, (n, *chw), solver, generator=generator).cpu())
    return torch.cat(parts)


def default_sampler(checkpoint: str | os.PathLike) -> str:
    """The solver that ``sample`` and ``gif`` use on ``checkpoint`` without --sampler: its path's ``default_solver``."""
    _, diffusion = model_from_state(load_checkpoint(checkpoint), checkpoint)
    return diffusion.make_path().default_solver


def prepare(request: SampleRequest) -> SamplePlan:
    """Check ``request`` and load its model: the checkpoint, the solver on its path, the labels and guidance against
    it, and finally a few predictions of the network (``sampling.check_network``).

    Nothing here allocates in proportion to ``request.num``, so a caller can check that the output fits
    (with ``plan.chw`` and ``plan.num_steps``) before drawing.
    """
    device = resolve_device(request.device)
    model, diffusion = load_model(request.checkpoint, device)
    request.solver.grid(diffusion.make_path())  # raises for steps outside 1 ... T, and DDPM with fewer than T or off the VP path
    c = model.config
    chw = (c.in_channels, c.image_size, c.image_size)
    classes, guide = guidance(request, c.num_classes, diffusion, chw, device)
    denoiser = Denoiser(model, diffusion, bf16=use_bf16(request.precision, device), batch_size=BATCH)
    check_network(denoiser, chw)  # a blown-up or untrained model is refused before the long run
    return SamplePlan(request, denoiser, request.solver, chw, classes, guide)


def guidance(request: SampleRequest, model_classes: int, diffusion, chw: tuple, device: torch.device) -> tuple[list[int] | None, dict]:
    """The classes to draw (or None) and denoiser.guided's guidance arguments of label, guidance, classifier and
    classifier_scale, checked against the model (class-conditional when ``model_classes`` > 0) and each other."""
    r = request
    if r.classifier_scale is not None and r.classifier is None:
        raise ValueError("--classifier-scale needs --classifier")
    if r.guidance is not None and not model_classes:
        raise ValueError(f"--guidance: {r.checkpoint} is an unconditional model; guide it with --classifier and --label instead")
    if r.label is None:
        if r.guidance is not None or r.classifier is not None:
            raise ValueError(f"--{'guidance' if r.guidance is not None else 'classifier'} needs --label, the class to guide toward")
        return None, {}
    classifier = None
    if r.classifier is not None:
        classifier, trained_for = load_noisy_classifier(r.classifier)
        try:
            check_matches(classifier, trained_for, diffusion, chw)
        except ValueError as e:
            raise ValueError(f"--classifier {r.classifier} does not fit {r.checkpoint}: {e}") from None
        classifier = classifier.to(device)
        classes = classifier.config.num_classes
    elif model_classes:
        classes = model_classes
    else:
        raise ValueError(f"--label: {r.checkpoint} is an unconditional model; add --classifier to guide it toward a class")
    wanted = list(range(classes)) if r.label == "all" else list(r.label)
    outside = [v for v in wanted if not 0 <= v < classes]
    if not wanted or outside:
        raise ValueError(f"--label {max(outside, default=r.label)} is out of range: this model knows classes 0 ... {classes - 1}")
    if r.num < len(wanted):
        raise ValueError(f"--num {r.num} is fewer images than the {len(wanted)} classes asked for; pass --num {len(wanted)} or more")
    guide = {"guidance": DEFAULT_GUIDANCE if r.guidance is None else r.guidance} if model_classes else {}
    if classifier is not None:
        guide.update(classifier=classifier, classifier_scale=DEFAULT_CLASSIFIER_SCALE if r.classifier_scale is None else r.classifier_scale)
    return wanted, guide
