"""A small MNIST classifier: the feature extractor and judge behind ddpm_lib.metrics.

Trained by ``scripts/train_classifier.py`` on the MNIST training split only and shipped as
``checkpoints/mnist_classifier.pt``. Images are (B, 1, 28, 28) in [-1, 1], like the diffusion
model's samples; labels are the digits 0-9.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import get_dataset
from .prediction_cache import cache_path, cached

FEATURE_DIM = 128  # the width of the features the Frechet distance compares


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MnistClassifier(nn.Module):
    """Five 3x3 conv layers (32, 32 | pool | 64, 64 | pool | 128) and a global average pool: 0.14 M parameters."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            conv_block(1, 32), conv_block(32, 32), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            conv_block(32, 64), conv_block(64, 64), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            conv_block(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128)
        )  # fmt: skip
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) images in [-1, 1] -> (B, 128) non-negative features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) images in [-1, 1] -> (B, 10) logits."""
        return self.head(self.dropout(self.features(x)))


def mnist_tensors(root: str | os.PathLike | None = None, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole MNIST split as tensors: images (N, 1, 28, 28) in [-1, 1] and labels (N,)."""
    dataset = get_dataset("mnist", root, train)
    return dataset.data[:, None].float() / 127.5 - 1, dataset.targets.clone()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random small affine warp per image (rotation up to 10 degrees, scale 0.9-1.1, shift up to 2 px)."""
    B = len(x)
    u = torch.rand(B, 4, generator=generator) * 2 - 1  # (B, 4) in [-1, 1]
    angle, scale, shift = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1], u[:, 2:] * 2 / 14  # shift in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # pad with background (-1), not 0


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> MnistClassifier:
    """Train a :class:`MnistClassifier` with AdamW, a one-cycle learning rate and augmentation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MnistClassifier()
    steps_per_epoch = len(images) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="classifier", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(model(augment(images[idx], generator)), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


CACHE_MIN_IMAGES = 5000  # predictions for sets at least this large (the MNIST test set: 12 s on 2 CPU cores) are kept on disk


def predict(model: MnistClassifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, 128) and class probabilities (N, 10) of images (N, 1, 28, 28) in [-1, 1], in eval mode.

    Sets of at least :data:`CACHE_MIN_IMAGES` images (reference sets such as the MNIST test set,
    which notebooks 7 and 8 and the scripts all score against) are computed once and kept on disk
    by :mod:`ddpm_lib.prediction_cache`, which checks a cached result before using it, so that the
    cache never changes a number.
    """
    if len(images) < CACHE_MIN_IMAGES:
        return _predict(model, images, batch_size)
    path = cache_path(model.state_dict().values(), images)
    return cached(path, images, lambda x: _predict(model, x, batch_size))


@torch.inference_mode()
def _predict(model: MnistClassifier, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    features, probs = [], []
    for batch in images.split(batch_size):
        f = model.features(batch.float())
        features.append(f)
        probs.append(model.head(f).softmax(dim=1))
    return torch.cat(features), torch.cat(probs)


def accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images whose most probable class is the label."""
    return (predict(model, images)[1].argmax(dim=1) == labels).float().mean().item()


def save_classifier(path: str | os.PathLike, model: MnistClassifier, test_accuracy: float, train_images: int) -> None:
    save_checkpoint(path, {"classifier": model.state_dict(), "test_accuracy": test_accuracy, "train_images": train_images})


def load_classifier(path: str | os.PathLike = "checkpoints/mnist_classifier.pt") -> MnistClassifier:
    """The shipped classifier (or another saved by save_classifier), in eval mode."""
    state = load_checkpoint(path)
    if "classifier" not in state:
        raise CheckpointError(f"{path} is a diffusion checkpoint, not a classifier; the classifier is checkpoints/mnist_classifier.pt")
    model = MnistClassifier()
    model.load_state_dict(state["classifier"])
    return model.eval()
