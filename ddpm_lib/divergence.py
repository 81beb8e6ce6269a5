"""Catching a training run that blows up at the step it happens, before anything of it is saved.

A NaN is the last symptom of a blow-up, not the first. With a far too high learning rate one
AdamW step can take finite weights to 1e29: the loss of that step was still normal (it is
computed before the update), the weights are finite, and a checkpoint written then would hold a
model that draws black images. So :class:`DivergenceGuard` checks every step twice:

1. before the optimizer step: the loss and the gradient norm are finite, and the loss is not a
   spike far above its recent median;
2. after it: the weights are finite and their global norm did not jump.

A slow blow-up passes both: a learning rate far too high can grow the weights 10% a step, never a
jump, and a checkpoint every step would then replace the good file with ever worse ones. So before a
checkpoint is written, :meth:`DivergenceGuard.check_drift` also compares the weights' norm with that
of an earlier checkpoint, at least :attr:`DivergenceGuard.window` steps older where there is one.

Its thresholds are far from anything a healthy run does (docs/experiments.md, section 4): over
the 30,000 steps of the shipped MNIST recipe (``checkpoints/mnist_ddpm.pt``'s loss history) the
largest loss over the median of the 100 steps before it is 2.17 (1.85 over the CFG fine-tune's
8,000), against :attr:`DivergenceGuard.loss_spike` = 20; and over the recipe's first 300 steps,
warm-up to the peak learning rate, the weights' norm changed by at most 0.011% a step, against a
factor of 2.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


class DivergenceError(RuntimeError):
    """Training blew up at a step: a NaN, an infinity, a loss spike or a jump of the weights. Nothing
    from that step on was saved."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}")
        self.step = step  # 1-based: the step that failed


def weight_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The global L2 norm of the weights: inf or NaN only when a weight is.

    Summed in the weights' own precision, which is fast; float32 squares overflow from about 1e19,
    so a norm that comes out non-finite is summed again in float64 (finite weights of 1e29 give 1e31).
    """
    tensors = [p.detach() for p in parameters]
    norm = torch.nn.utils.get_total_norm(tensors).item()
    if not math.isfinite(norm):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])).item()
    return norm


@dataclass(frozen=True)
class DivergenceGuard:
    window: int = 100  # the loss is compared with the median of this many steps before it
    min_history: int = 20  # no spike check before this many steps have been logged
    loss_spike: float = 20.0  # a loss this many times that median is a blow-up ...
    loss_floor: float = 2.0  # ... if it also exceeds this: twice what predicting zero noise costs (L_simple = 1)
    weight_jump: float = 2.0  # the weights' global norm may not grow or shrink by this factor in one step
    checkpoint_drift: float = 4.0  # ... nor by this factor between an earlier checkpoint and the one about to be written

    def __post_init__(self) -> None:
        for name in ("window", "min_history"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive whole number, got {getattr(self, name)!r}")
        for name in ("loss_spike", "weight_jump", "checkpoint_drift"):
            if not getattr(self, name) > 1:  # also refuses NaN
                raise ValueError(f"{name} must be a number > 1, got {getattr(self, name)}")

    def check_step(self, step: int, loss: float, grad_norm: float, history: Sequence[float]) -> None:
        """Before the optimizer step ``step`` (1-based): raise :class:`DivergenceError` if the batch's
        ``loss`` or ``grad_norm`` is not finite, or the loss spikes above the recent ``history``."""
        if not math.isfinite(loss):
            raise DivergenceError(step, f"the loss is {loss}")
        if not math.isfinite(grad_norm):
            raise DivergenceError(step, f"the gradient norm is {grad_norm}")
        if len(history) >= self.min_history and loss > self.loss_floor:
            median = statistics.median(history[-self.window :])
            if loss > self.loss_spike * median:
                what = f"the loss jumped to {loss:.4g}, {loss / median:.0f} times the median of the last {self.window} steps ({median:.4g})"
                raise DivergenceError(step, what)

    def check_weights(self, step: int, norm_before: float, norm_after: float) -> None:
        """After the optimizer step ``step``: raise :class:`DivergenceError` if the weights' global norm
        is not finite or changed by the factor :attr:`weight_jump` or more."""
        if not math.isfinite(norm_after):
            raise DivergenceError(step, "the weights hold NaN or inf after the optimizer step")
        if norm_before > 0 and not 1 / self.weight_jump < norm_after / norm_before < self.weight_jump:
            raise DivergenceError(step, f"the weights' norm jumped from {norm_before:.4g} to {norm_after:.4g} in one optimizer step")

    def reference(self, saved: Sequence[tuple[int, float]], step: int) -> tuple[int, float] | None:
        """The (step, norm) that a checkpoint at ``step`` is compared with, from the run's earlier checkpoints ``saved``
        (oldest first): the latest at least :attr:`window` steps older, else the oldest; None before the first."""
        older = [entry for entry in saved if entry[0] <= step - self.window]
        return older[-1] if older else (saved[0] if saved else None)

    def check_drift(self, step: int, saved: Sequence[tuple[int, float]], norm: float) -> None:
        """Before the checkpoint of ``step``: raise :class:`DivergenceError` if the weights' norm ``norm`` grew or shrank by
        :attr:`checkpoint_drift` or more from that of :meth:`reference`."""
        ref = self.reference(saved, step)
        if ref is not None and ref[1] > 0 and not 1 / self.checkpoint_drift < norm / ref[1] < self.checkpoint_drift:
            raise DivergenceError(
                step, f"the weights' norm went from {ref[1]:.4g} at the checkpoint of step {ref[0]} to {norm:.4g}, a slow blow-up"
            )
