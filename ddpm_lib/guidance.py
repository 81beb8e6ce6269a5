"""Steering the reverse process toward a class y: classifier-free guidance and classifier guidance.

Both follow from Bayes' rule on the score, grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t),
and eps_theta(x_t, t) = -sqrt(1 - alpha_bar_t) grad log p(x_t), so a guided eps is an ordinary eps
that every solver takes alike (applied by ``denoiser.ClassifierFree`` and ``ClassifierGuided``). t is 0-based; images (B, C, H, W) in
[-1, 1]; labels (B,) integers 0 ... K-1.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_GUIDANCE = 1.0  # the CLI's CFG weight w for checkpoints/mnist_cfg.pt: 99% as asked at the least loss of variety (docs/guidance.md)
DEFAULT_CLASSIFIER_SCALE = 4.0  # the CLI's classifier-guidance scale s for mnist_ddpm.pt: its lowest class-wise FD, 95% as asked


def num_classes(model: nn.Module) -> int:
    """The classes a U-Net is conditioned on (0: unconditional), from its config."""
    return getattr(getattr(model, "config", None), "num_classes", 0)


def class_blocks(classes: list[int], n: int, start: int = 0, count: int | None = None) -> torch.Tensor:
    """(n,) labels in equal blocks of ``classes``, in their order: class_blocks([0, 1, 2], 6) = [0, 0, 1, 1, 2, 2].

    When n is not a multiple of len(classes), the blocks differ by at most one image. With ``start``
    and ``count``, only the (count,) labels of images start ... start + count - 1 of the n.
    """
    if n < len(classes):
        raise ValueError(f"{n} images are fewer than the {len(classes)} classes asked for")
    stop = n if count is None else start + count
    if not 0 <= start <= stop <= n:
        raise ValueError(f"images {start} ... {stop - 1} of {n} do not exist")
    return torch.tensor([classes[i * len(classes) // n] for i in range(start, stop)])


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2021, Eq. 6): (1 + w) eps(x_t, y) - w eps(x_t).

    w = 0 is the plain conditional model; w > 0 pushes further from the unconditional prediction.
    Libraries that write eps(x_t) + s (eps(x_t, y) - eps(x_t)), such as diffusers' ``guidance_scale``,
    use s = 1 + w: their s = 1 is this w = 0. Because the weights sum to one, the same combination
    of the network's outputs is right for x0- and v-prediction too (each is affine in eps given x_t).
    """
    return (1 + w) * cond - w * uncond


def classifier_grad(classifier: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x_t, t) of a time-conditioned classifier, shaped like x_t (Dhariwal & Nichol 2021).

    Works inside ``torch.inference_mode`` (where the sampler runs): the gradient is taken on a
    fresh copy of x_t, and only with respect to it.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        log_probs = classifier(x, t.clone()).float().log_softmax(dim=1)  # (B, K)
        chosen = log_probs[torch.arange(len(x), device=x.device), y.clone()].sum()  # each image's own term
        (grad,) = torch.autograd.grad(chosen, x)
    return grad.detach()  # (B, C, H, W)
