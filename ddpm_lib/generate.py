"""From a checkpoint and a few choices to images: what ``python -m ddpm_lib sample`` and ``gif`` do, without argparse.

A :class:`SampleRequest` says what to draw; :func:`prepare` checks every choice, loads the model
(and a noisy classifier, for classifier guidance), and refuses a network that cannot sample before
any long work; the :class:`SamplePlan` it returns draws the images in batches of :data:`BATCH`, or
yields the reverse process of all of them for a GIF. Errors are ``ValueError``s whose message names
each field as its command-line flag (``classifier_scale`` is ``--classifier-scale``). Images are
(N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import load_model
from .denoiser import Denoiser, guided
from .devices import resolve_device, use_bf16
from .guidance import DEFAULT_CLASSIFIER_SCALE, DEFAULT_GUIDANCE, class_blocks
from .noisy_classifier import check_matches, load_noisy_classifier
from .sampling import SamplerStep, check_network, check_samples, check_trajectory, sample, sample_loop
from .solvers import make_solver

BATCH = 256  # images the network sees at once: memory stays flat however many are drawn


@dataclass(frozen=True)
class SampleRequest:
    """What to draw, as the CLI's sample and gif take it; None means the default."""

    checkpoint: str  # a checkpoint written by train or export
    num: int = 64  # images to draw
    sampler: str = "ddpm"  # one of solvers.SOLVERS
    steps: int | None = None  # the solver's steps (None: T; DDPM always takes T)
    eta: float | None = None  # DDIM's noise scale (None: 0, deterministic)
    variance: str | None = None  # DDPM's step variance (None: beta_tilde)
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
    solver: object  # a solvers.SOLVERS instance
    chw: tuple[int, int, int]  # the images' (C, H, W)
    classes: list[int] | None  # the classes drawn in equal blocks, or None
    guide: dict  # denoiser.guided's guidance, classifier and classifier_scale

    @property
    def num_steps(self) -> int:
        """The steps a trajectory yields: every visited point and the finished sample."""
        return len(self.solver.grid(self.denoiser.path))

    def labels(self, start: int, count: int) -> torch.Tensor | None:
        """The (count,) labels of images start ... start + count - 1, or None without labels."""
        if self.classes is None:
            return None
        return class_blocks(self.classes, self.request.num, start, count)

    def images(self) -> torch.Tensor:
        """The request's images (num, C, H, W) on the CPU, in batches of :data:`BATCH`, each from its own x_T.

        Raises :class:`~ddpm_lib.sampling.DegenerateModelError` if they are broken or blank."""
        generator = torch.Generator().manual_seed(self.request.seed)
        batches = []
        for start in range(0, self.request.num, BATCH):
            n = min(BATCH, self.request.num - start)
            denoiser = guided(self.denoiser, self.labels(start, n), **self.guide)
            batches.append(sample(denoiser, (n, *self.chw), self.solver, generator=generator).cpu())
        return check_samples(torch.cat(batches))

    def trajectory(self) -> Iterator[SamplerStep]:
        """Every step of the reverse process of all num images at once (for a GIF); the finished samples are
        checked before they are yielded."""
        generator = torch.Generator().manual_seed(self.request.seed)
        denoiser = guided(self.denoiser, self.labels(0, self.request.num), **self.guide)
        return check_trajectory(sample_loop(denoiser, (self.request.num, *self.chw), self.solver, generator=generator))


def prepare(request: SampleRequest) -> SamplePlan:
    """Check ``request`` and load its model: the solver's options first, then the checkpoint, the labels and
    guidance against it, and finally a few predictions of the network (``sampling.check_network``).

    Nothing here allocates in proportion to ``request.num``, so a caller can check that the output fits
    (with ``plan.chw`` and ``plan.num_steps``) before drawing.
    """
    solver = make_solver(request.sampler, steps=request.steps, eta=request.eta, variance=request.variance)  # checks its options
    device = resolve_device(request.device)
    model, diffusion = load_model(request.checkpoint, device)
    solver.grid(diffusion.make_path())  # raises for steps outside 1 ... T, and DDPM with fewer than T or off the VP path
    c = model.config
    chw = (c.in_channels, c.image_size, c.image_size)
    classes, guide = guidance(request, c.num_classes, diffusion, chw, device)
    denoiser = Denoiser(model, diffusion, bf16=use_bf16(request.precision, device), batch_size=BATCH)
    check_network(denoiser, chw)  # a blown-up or untrained model is refused before the long run
    return SamplePlan(request, denoiser, solver, chw, classes, guide)


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
