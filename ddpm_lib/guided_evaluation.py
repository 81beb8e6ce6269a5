"""Guided samples scored: is it the digit asked for, how sure is the judge, how varied are they (notebook 08).

``guided_sweep`` draws N samples per guidance strength (w of classifier-free guidance, or s of
classifier guidance), an equal share of each digit in class order (``guidance.class_blocks``),
from the same seed, so every strength starts from the same noise. The MNIST judge
(``ddpm_lib.metrics``) gives each row:

- label accuracy: the share it classifies as the digit asked for;
- confident share: the share it classifies with probability >= 0.9;
- class-wise Frechet distance: the mean over digits of the Frechet distance between the samples
  asked to be that digit and the test images of that digit. It falls when samples look like real
  ones of their class and rises when they lose variety, so it shows what guidance costs;
- the unconditional figures of ``metrics.score`` (Frechet distance to all test digits, class entropy).

Rows are cached in a JSON file keyed by the SHA-256 of the weights, like ``evaluation.evaluate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import ScalarFormatter

from .classifier import MnistClassifier, predict
from .diffusion import DiffusionConfig
from .evaluation import MEASUREMENT, Measurement, draw
from .guidance import class_blocks
from .metrics import GaussianStats, Quality, frechet_distance, gaussian_stats, score
from .solvers import DDIM

METHODS = ("cfg", "classifier")  # classifier-free guidance (strength w), classifier guidance (scale s)


@dataclass(frozen=True)
class GuidedQuality:
    """What the judge sees in n samples that were each asked to be a digit."""

    label_accuracy: float  # share classified as the digit asked for
    class_frechet: float  # mean over digits of the Frechet distance to that digit's test images
    quality: Quality  # the unconditional figures: Frechet distance to all test digits, confident share, entropy


@dataclass(frozen=True)
class GuidedRow:
    method: str  # one of METHODS
    strength: float  # w for "cfg", s for "classifier"
    guided: GuidedQuality
    seconds_per_image: float  # sampling wall time / n
    steps: int  # DDIM steps
    seed: int
    bf16: bool  # whether the U-Net ran under bf16 autocast


def class_references(judge: MnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> list[GaussianStats]:
    """The Gaussian of the judge's features of each class's images (N, 1, 28, 28), in class order 0 ... 9."""
    features = predict(judge, images)[0]
    return [gaussian_stats(features[labels == k]) for k in range(int(labels.max()) + 1)]


def score_guided(
    judge: MnistClassifier, images: torch.Tensor, asked: torch.Tensor, references: list[GaussianStats], overall: GaussianStats
) -> GuidedQuality:
    """Score images (N, 1, 28, 28) in [-1, 1] that were asked to be the digits ``asked`` (N,)."""
    features, probs = predict(judge, images.cpu())
    classes = asked.unique().tolist()
    class_fd = sum(frechet_distance(gaussian_stats(features[asked == k]), references[k]) for k in classes) / len(classes)
    label_accuracy = (probs.argmax(dim=1) == asked).double().mean().item()
    return GuidedQuality(label_accuracy, class_fd, score(judge, images, overall))


def guided_floor(
    judge: MnistClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    references: list[GaussianStats],
    overall: GaussianStats,
    n: int,
    seed: int = 0,
) -> GuidedQuality:
    """The same scores for n real training images, an equal share of each digit: the best a model can hope for."""
    generator = torch.Generator().manual_seed(seed)
    asked = class_blocks(list(range(len(references))), n)
    picks = []
    for k in range(len(references)):
        of_k = torch.nonzero(labels == k).flatten()  # the indices of digit k
        picks.append(of_k[torch.randperm(len(of_k), generator=generator)[: int((asked == k).sum())]])
    pick = torch.cat(picks)  # in class order, like asked
    return score_guided(judge, images[pick], asked, references, overall)


def guided_sweep(
    model: torch.nn.Module,
    diffusion: DiffusionConfig,
    judge: MnistClassifier,
    references: list[GaussianStats],
    overall: GaussianStats,
    method: str,
    strengths: Iterable[float],
    steps: int = 50,
    classifier: torch.nn.Module | None = None,
    measurement: Measurement = MEASUREMENT,
) -> list[GuidedRow]:
    """One :class:`GuidedRow` per strength: ``measurement.n`` DDIM-``steps`` samples of every digit in equal shares.

    ``method`` "cfg" guides a class-conditional ``model`` with weight w; "classifier" guides any
    ``model`` with the noisy ``classifier`` at scale s. Rows are cached and read back as ``measurement`` says (its
    model id naming the weights of the model and, for "classifier", of the classifier too).
    """
    if method not in METHODS:
        raise ValueError(f"unknown guidance method {method!r}; valid choices: {', '.join(METHODS)}")
    if method == "classifier" and classifier is None:
        raise ValueError("classifier guidance needs the noisy classifier")
    m = measurement
    asked = class_blocks(list(range(len(references))), m.n)

    def compute(strength: float) -> GuidedRow:
        guide = {"guidance": strength} if method == "cfg" else {"classifier": classifier, "classifier_scale": strength}
        images, seconds = draw(model, diffusion, DDIM(steps), m.n, m.seed, bf16=m.bf16, labels=asked, **guide)
        scores = score_guided(judge, images, asked, references, overall)
        return GuidedRow(method, float(strength), scores, seconds / m.n, steps, m.seed, m.bf16)

    return [m.row([method, float(s), m.n, steps, m.seed], lambda s=s: compute(s), row_from_dict, dataclasses.asdict) for s in strengths]


def row_from_dict(d: dict) -> GuidedRow:
    g = d["guided"]
    quality = Quality(**{**g["quality"], "counts": tuple(g["quality"]["counts"])})
    return GuidedRow(**{**d, "guided": GuidedQuality(g["label_accuracy"], g["class_frechet"], quality)})


def markdown_table(rows: list[GuidedRow], floor: GuidedQuality) -> str:
    """The sweep as a Markdown table, the real-data floor first."""
    name = {"cfg": "w", "classifier": "s"}
    lines = [
        "| guidance | label accuracy | confident | class-wise FD | FD (all digits) | class entropy | cost per image |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| real training images (floor) | {floor.label_accuracy:.1%} | {floor.quality.confident:.1%} | {floor.class_frechet:.2f} | "
        f"{floor.quality.frechet:.2f} | {floor.quality.entropy:.3f} | - |",
    ]
    for r in rows:
        g = r.guided
        lines.append(
            f"| {name[r.method]} = {r.strength:g} | {g.label_accuracy:.1%} | {g.quality.confident:.1%} | {g.class_frechet:.2f} | "
            f"{g.quality.frechet:.2f} | {g.quality.entropy:.3f} | {cost(r)} |"
        )
    return "\n".join(lines)


def cost(row: GuidedRow) -> str:
    """A row's sampling cost in network evaluations, which do not depend on the machine (its wall time does).

    CFG with w != 0 evaluates the U-Net on 2B images a step (conditional and "no label"); classifier
    guidance with s != 0 adds one gradient of the noisy classifier a step; at 0 both are the plain model.
    """
    if row.strength == 0:
        return f"{row.steps} U-Net"
    if row.method == "cfg":
        return f"{2 * row.steps} U-Net"
    return f"{row.steps} U-Net + {row.steps} classifier gradients"


def plot_sweep(rows: list[GuidedRow], floor: GuidedQuality) -> plt.Figure:
    """Label accuracy, confident share and class-wise Frechet distance against the guidance strength, one line per method."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        (lambda g: 100 * g.label_accuracy, 100 * floor.label_accuracy, "classified as the digit asked for (%)"),
        (lambda g: 100 * g.quality.confident, 100 * floor.quality.confident, "confidently classified (%)"),
        (lambda g: g.class_frechet, floor.class_frechet, "class-wise Frechet distance"),
    )
    names = {"cfg": "classifier-free, weight w", "classifier": "classifier guidance, scale s"}
    for ax, (value, floor_value, ylabel) in zip(axes, panels, strict=True):
        for method in METHODS:
            mine = sorted((r for r in rows if r.method == method), key=lambda r: r.strength)
            if mine:
                ax.plot([r.strength for r in mine], [value(r.guided) for r in mine], "o-", label=names[method])
        ax.axhline(floor_value, color="gray", ls="--", label="real training images")
        ax.set(xlabel="guidance strength (w or s)", ylabel=ylabel)
        ax.set_xscale("symlog", linthresh=0.5, linscale=0.5)  # 0 on the axis, and the strengths above it spaced evenly
        strengths = sorted({r.strength for r in rows})
        ax.set_xticks(strengths, [f"{s:g}" for s in strengths])
        ax.set_xlim(-0.1, strengths[-1] * 1.25)  # no point on the frame
    axes[2].set_yscale("log")
    axes[2].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].legend(fontsize=8)
    n, steps = rows[0].guided.quality.n, rows[0].steps
    fig.suptitle(f"What guidance buys and costs: {n} DDIM-{steps} samples per point, an equal share per digit")
    fig.tight_layout()
    return fig
