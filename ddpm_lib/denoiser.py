"""The denoiser: all a solver sees of a network, a prediction of x0 and eps at (x_t, p) for a grid point p.

A network predicts eps, x0, v or the flow velocity, as its checkpoint's ``DiffusionConfig.prediction``
records; :class:`Denoiser` feeds it x_t at the point's time and turns its output into both eps and x0
on the point's (alpha, sigma) (:mod:`ddpm_lib.parametrizations`), runs the network in batches of at most
``batch_size`` images and under bf16 autocast when asked. Guidance and clipping are denoisers that wrap a
denoiser (:class:`ClassifierFree`, :class:`ClassifierGuided`, :class:`Clipped`), each checking its own
arguments once, where it is built; so the solvers (:mod:`ddpm_lib.solvers`) never branch on them, and
every solver is guided the same way. :meth:`Denoiser.from_checkpoint` assembles all of it from a file.

Conventions: p is a :class:`~ddpm_lib.paths.GridPoint` of the denoiser's ``path``; x_t is (B, C, H, W) in
[-1, 1]-scaled units; labels are (B,) integers. Every denoiser is called as ``denoiser(x_t, p, y=None)``,
where ``y`` are labels for the network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .diffusion import DiffusionConfig
from .guidance import cfg_combine, classifier_grad, num_classes
from .parametrizations import PARAMETRIZATIONS, eps_from_x0, x0_from_eps
from .paths import GridPoint
from .sampling import eval_mode


class Prediction(NamedTuple):
    eps: torch.Tensor  # the predicted noise, (B, C, H, W)
    x0: torch.Tensor  # the predicted clean image, (B, C, H, W)


def in_batches(fn: Callable[..., torch.Tensor], batch_size: int | None, *tensors: torch.Tensor | None) -> torch.Tensor:
    """``fn`` applied to slices of at most ``batch_size`` rows of every tensor (None stays None), joined
    along dim 0: the one place a batch is split to bound memory (None: the whole batch at once)."""
    n = len(tensors[0])
    size = batch_size or n
    parts = [fn(*(None if x is None else x[i : i + size] for x in tensors)) for i in range(0, n, size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Denoiser:
    """A network as a denoiser: ``model(x_t, t, y)`` on ``diffusion``'s path, read as its parametrization ``diffusion.prediction``.

    ``bf16`` runs the network (only) under bf16 autocast; its outputs and everything after stay
    float32. ``batch_size`` caps how many images the network sees at once (its memory grows with
    it); the results do not depend on it.
    """

    def __init__(self, model: nn.Module, diffusion: DiffusionConfig, bf16: bool = False, batch_size: int | None = None):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.parametrization, self.bf16, self.batch_size = model, PARAMETRIZATIONS[diffusion.prediction], bf16, batch_size
        self.device = next(model.parameters()).device
        self.path = diffusion.make_path()  # its points are float64 numbers, read on the CPU
        self.num_classes = num_classes(model)  # 0: unconditional; label num_classes means "no label"

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "cpu",
        bf16: bool = False,
        batch_size: int | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 0.0,
        classifier: nn.Module | None = None,
        classifier_scale: float = 1.0,
        clip: bool = True,
    ):
        """The EMA network of ``checkpoint`` on ``device`` as a ready denoiser: its path, parametrization and
        classes from the file, then guidance and clipping as :func:`guided` assembles them."""
        from .checkpoint import load_model  # checkpoint.py checks networks with this module's Denoiser

        model, diffusion = load_model(checkpoint, device)
        return guided(cls(model, diffusion, bf16, batch_size), labels, guidance, classifier, classifier_scale, clip)

    def output(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's raw output at the point ``p``, float32, (B, C, H, W)."""
        scale = self.path.input_scale(p)

        def run(x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            t_batch = torch.full((len(x),), p.t, device=x.device)  # int64 for a VP index, float32 for a continuous time
            with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
                return (self.model(x * scale, t_batch) if labels is None else self.model(x * scale, t_batch, labels)).float()

        with eval_mode(self.model):  # dropout off: the same seed must give the same images
            return in_batches(run, self.batch_size, x_t, y)

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        return Prediction(*self.parametrization.to_eps_x0(self.output(x_t, p, y), x_t, p.alpha, p.sigma))


def check_count(labels: torch.Tensor, x_t: torch.Tensor) -> None:
    if len(labels) != len(x_t):
        raise ValueError(f"{len(labels)} labels for {len(x_t)} images: pass one label per image")


def check_labels(labels: torch.Tensor, classes: int, what: str) -> None:
    if labels.dim() != 1:
        raise ValueError(f"labels must be a (B,) tensor, one per image, got shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be classes 0 ... {classes - 1} of {what}, got {labels.min().item()} ... {labels.max().item()}")


class ClassifierFree:
    """Classifier-free guidance (Ho & Salimans 2021, Eq. 6) toward ``labels``: (1 + w) eps(x_t, y) - w eps(x_t).

    The conditional and the "no label" predictions come from one batched pass of 2B images. x0 is
    combined with the same weights, which is consistent: both are affine in the network's output
    with weights that sum to one. w = 0 is the plain conditional model, one pass of B.
    """

    def __init__(self, inner: Denoiser, labels: torch.Tensor, w: float):
        if not inner.num_classes:
            raise ValueError("classifier-free guidance needs a class-conditional model; guide an unconditional one with a classifier")
        if not math.isfinite(w):
            raise ValueError(f"the guidance weight w must be a finite number, got {w}")
        check_labels(labels, inner.num_classes, "the model")
        self.inner, self.w, self.path, self.device = inner, w, inner.path, inner.device
        self.labels = labels.to(inner.device)

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        check_count(self.labels, x_t)
        if self.w == 0:
            return self.inner(x_t, p, self.labels)
        null = torch.full_like(self.labels, self.inner.num_classes)
        both = self.inner(torch.cat([x_t, x_t]), p, torch.cat([self.labels, null]))
        (eps_c, eps_u), (x0_c, x0_u) = both.eps.chunk(2), both.x0.chunk(2)  # each (B, C, H, W)
        return Prediction(cfg_combine(eps_c, eps_u, self.w), cfg_combine(x0_c, x0_u, self.w))


class ClassifierGuided:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2) toward ``labels`` with scale s:
    eps - sigma_t s grad log p(y | x_t, t) (sigma_t = sqrt(1 - alpha_bar_t) on the VP path), and the x0 it implies.

    ``classifier(x_t, t)`` gives (B, K) logits of p(y | x_t, t); its gradient is taken in batches of
    at most ``batch_size`` images. Any solver takes the guided eps as it takes an unguided one.
    """

    def __init__(self, inner, classifier: nn.Module, labels: torch.Tensor, scale: float, batch_size: int | None = None):
        if not math.isfinite(scale):
            raise ValueError(f"the classifier scale s must be a finite number, got {scale}")
        if num_classes(classifier):  # a classifier without a config (K unknown) is checked as it runs
            check_labels(labels, num_classes(classifier), "the classifier")
        self.inner, self.classifier, self.scale, self.batch_size = inner, classifier, scale, batch_size
        self.path, self.device = inner.path, inner.device
        self.labels = labels.to(next(classifier.parameters()).device)

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        check_count(self.labels, x_t)
        pred = self.inner(x_t, p, y)

        def grad(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return classifier_grad(self.classifier, x, torch.full((len(x),), p.t, device=x.device), labels)

        g = in_batches(grad, self.batch_size, x_t, self.labels)  # grad log p(y | x_t, t), (B, C, H, W)
        eps = pred.eps - p.sigma * self.scale * g
        return Prediction(eps, x0_from_eps(x_t, eps, p.alpha, p.sigma))


class Clipped:
    """x0 clipped to the data range [-1, 1], and the eps that this x0 implies at x_t (as in Ho et al.'s code)."""

    def __init__(self, inner):
        self.inner, self.path, self.device = inner, inner.path, inner.device

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        x0 = self.inner(x_t, p, y).x0.clamp(-1, 1)
        return Prediction(eps_from_x0(x_t, x0, p.alpha, p.sigma), x0)


def guided(
    denoiser: Denoiser,
    labels: torch.Tensor | None = None,
    guidance: float = 0.0,
    classifier: nn.Module | None = None,
    classifier_scale: float = 1.0,
    clip: bool = True,
):
    """The usual assembly of a sampler's denoiser: guidance toward the (B,) class ``labels``, then x0 clipped.

    A class-conditional model uses the labels with classifier-free guidance of weight ``guidance``
    (w = 0: the plain conditional model; without labels it predicts for "no label"); a
    ``classifier`` p(y | x_t, t) guides any model with scale ``classifier_scale`` (at s = 0 it is
    left out, so no gradient is taken: the plain model, at its plain cost). ``clip`` clips
    x0 to [-1, 1], as Ho et al.'s code does.
    """
    if labels is None and (guidance != 0 or classifier is not None):
        raise ValueError("guidance needs the class labels to guide toward")
    if labels is not None and not denoiser.num_classes and classifier is None:
        raise ValueError("this model is unconditional: labels need a class-conditional model or a classifier to guide it")
    if guidance != 0 and not denoiser.num_classes:
        raise ValueError("classifier-free guidance needs a class-conditional model; an unconditional one takes a classifier")
    result = denoiser
    if labels is not None and denoiser.num_classes:
        result = ClassifierFree(result, labels, guidance)
    if classifier is not None and classifier_scale != 0:
        result = ClassifierGuided(result, classifier, labels, classifier_scale, denoiser.batch_size)
    return Clipped(result) if clip else result
