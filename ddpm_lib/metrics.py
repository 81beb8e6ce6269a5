"""Sample quality on MNIST, judged by the small classifier of ddpm_lib.classifier.

Three figures for a set of generated images (N, 1, 28, 28) in [-1, 1]:

- **Frechet distance** between Gaussians fitted to the classifier's 128-d features of the samples
  and of the MNIST test set (Heusel et al. 2017, Eq. 6, with our classifier in place of Inception).
  It is *not* comparable with the FID papers report: other features, other scale.
- **confident share**: the share of samples whose most probable class has probability >= 0.9.
- **class entropy** of the histogram of predicted classes, in nats (uniform over 10 digits: ln 10 = 2.303).

None of the three notices a model that copies its training digits, so :func:`nearest_neighbours`
measures how close each sample comes to the training set, to compare with new (test) digits.

Every figure depends on the number of samples (the Frechet distance is biased upwards for small
N), so compare a model only with the real-data floor at the same N: real training images scored
the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .classifier import MnistClassifier, predict

CONFIDENCE = 0.9  # a sample counts as confidently classified at this top-class probability
UNIFORM_ENTROPY = math.log(10)  # the class entropy of perfectly balanced digits, 2.303 nats
# The course's quality targets for the shipped model: Frechet distance at most 3x the real-data floor,
# at least 90% of samples confidently classified, class entropy at least 2.25 nats.
MAX_FRECHET_RATIO, MIN_CONFIDENT, MIN_ENTROPY = 3.0, 0.9, 2.25


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a set of feature vectors, in float64."""

    mu: torch.Tensor
    sigma: torch.Tensor


def gaussian_stats(features: torch.Tensor) -> GaussianStats:
    """Fit a Gaussian to features (N, D): the mean and the unbiased covariance."""
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(features)}")
    f = features.double()
    return GaussianStats(f.mean(dim=0), torch.cov(f.T))


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64.

    Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    a symmetric matrix with the same eigenvalues as S_a S_b, so no general matrix square root is needed.
    """
    w, v = torch.linalg.eigh(a.sigma)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T  # S_a^(1/2)
    eig = torch.linalg.eigvalsh(sqrt_a @ b.sigma @ sqrt_a)
    tr_sqrt = eig.clamp(min=0).sqrt().sum()
    return ((a.mu - b.mu).square().sum() + a.sigma.trace() + b.sigma.trace() - 2 * tr_sqrt).item()


def class_entropy(counts: torch.Tensor) -> float:
    """Entropy in nats of the distribution given by a histogram of counts (empty classes contribute 0)."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return -(p * p.log()).sum().item()


@dataclass(frozen=True)
class Quality:
    """The three quality figures of N images, and their predicted-class histogram."""

    n: int  # images scored
    frechet: float  # Frechet distance to the reference (MNIST test set) features
    confident: float  # share of images classified with probability >= CONFIDENCE
    entropy: float  # entropy of the predicted-class histogram, nats (max ln 10 = 2.303)
    counts: tuple[int, ...]  # images predicted as each digit 0-9


def score(classifier: MnistClassifier, images: torch.Tensor, reference: GaussianStats) -> Quality:
    """Score images (N, 1, 28, 28) in [-1, 1] against ``reference`` (see :func:`reference_stats`)."""
    if images.shape[1:] != (1, 28, 28):
        raise ValueError(f"the MNIST classifier scores (N, 1, 28, 28) images, got {tuple(images.shape)}")
    features, probs = predict(classifier, images.cpu())
    top, label = probs.max(dim=1)
    counts = torch.bincount(label, minlength=10)
    return Quality(
        n=len(images),
        frechet=frechet_distance(gaussian_stats(features), reference),
        confident=(top >= CONFIDENCE).double().mean().item(),
        entropy=class_entropy(counts),
        counts=tuple(counts.tolist()),
    )


def reference_stats(classifier: MnistClassifier, images: torch.Tensor) -> GaussianStats:
    """The Gaussian of the classifier's features of reference images (the MNIST test set)."""
    return gaussian_stats(predict(classifier, images)[0])


def real_data_floor(classifier: MnistClassifier, train_images: torch.Tensor, reference: GaussianStats, n: int, seed: int = 0) -> Quality:
    """The best a model can hope for at n samples: n random real training images scored like samples."""
    if n > len(train_images):
        raise ValueError(f"the floor at n={n} needs {n} training images, only {len(train_images)} are here")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    return score(classifier, train_images[pick], reference)


def target_misses(quality: Quality, floor: Quality) -> list[str]:
    """The course's quality targets that ``quality`` misses, each as a sentence; [] when it meets them all."""
    misses = []
    if quality.frechet > MAX_FRECHET_RATIO * floor.frechet:
        misses.append(f"Frechet distance {quality.frechet:.2f} > {MAX_FRECHET_RATIO:g} x floor {floor.frechet:.2f}")
    if quality.confident < MIN_CONFIDENT:
        misses.append(f"confident share {quality.confident:.1%} < {MIN_CONFIDENT:.0%}")
    if quality.entropy < MIN_ENTROPY:
        misses.append(f"class entropy {quality.entropy:.3f} < {MIN_ENTROPY} nats")
    return misses


def nearest_neighbours(images: torch.Tensor, references: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest of ``references`` (M, C, H, W) to each of ``images`` (N, C, H, W), in pixel space.

    Returns the Euclidean distances (N,) and the indices into ``references`` (N,), computed in
    float64, ``chunk`` images at a time. Samples that are copies of training images sit much
    closer to the training set than new digits do: compare with the distances of test images.
    """
    if images.shape[1:] != references.shape[1:]:
        raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} must have the same image shape")
    refs = references.flatten(1).double()  # (M, D)
    distances, indices = [], []
    for batch in images.flatten(1).double().split(chunk):  # (chunk, D)
        nearest = torch.cdist(batch, refs).min(dim=1)  # over the (chunk, M) distance matrix
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)
