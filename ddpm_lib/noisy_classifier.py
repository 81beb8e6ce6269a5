"""A time-conditioned classifier p(y | x_t, t), the guide of classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

It is the U-Net's encoder half with a classification head: the same sinusoidal time embedding
and residual blocks (``ddpm_lib.unet``), average pooling between levels, then a global average
pool and a linear layer to K logits. Trained on training images noised to a uniformly drawn t,
it learns to read the class out of x_t at every noise level; ``guidance.classifier_grad`` takes
the gradient of its log-probability. Images are (B, C, H, W) in [-1, 1] (x_t at 0-based t);
labels (B,) integers 0 ... K-1. Trained by ``scripts/train_noisy_classifier.py`` and shipped as
``checkpoints/mnist_noisy_classifier.pt``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, check_finite, config_from_dict, load_checkpoint, save_checkpoint
from .diffusion import DiffusionConfig, q_sample
from .resources import require_model
from .schedules import NoiseSchedule
from .unet import LIMITS, MAX_LEVELS, ResBlock, timestep_embedding


@dataclass(frozen=True)
class NoisyClassifierConfig:
    in_channels: int = 1  # image channels
    image_size: int = 28  # side of the square images; halved between levels
    num_classes: int = 10  # K, the classes it tells apart
    base_channels: int = 32  # channels of the first level (the time embedding has 4x as many)
    channel_mults: tuple[int, ...] = (1, 2, 2)  # channels per level as multiples of base_channels: 28, 14, 7 for MNIST
    num_groups: int = 8  # GroupNorm groups; must divide every channel count

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_classes", "base_channels", "num_groups"):  # the U-Net's limits
            if not isinstance(getattr(self, name), int) or not 1 <= getattr(self, name) <= LIMITS[name]:
                raise ValueError(f"{name} must be a whole number from 1 to {LIMITS[name]:,}, got {getattr(self, name)!r}")
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={self.num_classes}")
        most = LIMITS["channel_mults"]
        if not 1 <= len(self.channel_mults) <= MAX_LEVELS or not all(isinstance(m, int) and 1 <= m <= most for m in self.channel_mults):
            raise ValueError(f"channel_mults must be 1 to {MAX_LEVELS} whole numbers from 1 to {most}, got {self.channel_mults}")
        bad = [self.base_channels * m for m in self.channel_mults if self.base_channels * m % self.num_groups]
        if bad:
            raise ValueError(f"{bad[0]} channels are not divisible by num_groups={self.num_groups}")
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"image_size {self.image_size} cannot be halved {len(self.channel_mults) - 1} times; use fewer channel_mults")


class NoisyClassifier(nn.Module):
    """classifier(x_t, t) -> (B, K) logits of p(y | x_t, t)."""

    def __init__(self, config: NoisyClassifierConfig = NoisyClassifierConfig()):
        super().__init__()
        self.config = cfg = config
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        channels = [ch * m for m in cfg.channel_mults]
        pairs = zip([ch, *channels[:-1]], channels, strict=True)
        self.blocks = nn.ModuleList(ResBlock(c_in, c_out, emb_dim, 0.0, cfg.num_groups) for c_in, c_out in pairs)
        self.head = nn.Sequential(nn.GroupNorm(cfg.num_groups, channels[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(channels[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))  # (B, 4 * base)
        h = self.stem(x)  # (B, base, H, W)
        for i, block in enumerate(self.blocks):
            if i:
                h = F.avg_pool2d(h, 2)  # (B, c, H / 2^i, W / 2^i)
            h = block(h, emb)
        return self.out(self.head(h))  # (B, K)


def train_noisy_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    config: NoisyClassifierConfig = NoisyClassifierConfig(),
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> NoisyClassifier:
    """Train on x_t = q_sample(x0, t) with t ~ Uniform{0 ... T-1} and cross-entropy (AdamW, one-cycle learning rate).

    images (N, C, H, W) in [-1, 1] and labels (N,): the clean training set; every step draws a
    batch, a t per image and fresh noise from one generator seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoisyClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    with tqdm(total=steps, disable=not progress, desc="noisy classifier", unit="step") as bar:
        for _ in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=generator)  # (B,)
            t = torch.randint(0, schedule.T, (batch_size,), generator=generator)  # (B,)
            noise = torch.randn(images[idx].shape, generator=generator)
            loss = F.cross_entropy(model(q_sample(images[idx], t, schedule, noise), t), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.inference_mode()
def accuracy_by_t(
    model: NoisyClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    seed: int = 0,
    batch_size: int = 1000,
) -> list[float]:
    """The share of images (N, C, H, W) in [-1, 1], noised to each 0-based t of ``timesteps``, classified as their label."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    result = []
    for t in timesteps:
        correct = 0
        for x0, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            t_batch = torch.full((len(x0),), t, dtype=torch.long)
            x_t = q_sample(x0, t_batch, schedule, torch.randn(x0.shape, generator=generator))
            correct += (model(x_t, t_batch).argmax(dim=1) == y).sum().item()
        result.append(correct / len(images))
    return result


def save_noisy_classifier(
    path: str | os.PathLike, model: NoisyClassifier, diffusion: DiffusionConfig, accuracy: dict[int, float], train_images: int
) -> None:
    """Write the classifier with its config, the diffusion config it was trained for, and its test accuracy by t."""
    save_checkpoint(
        path,
        {
            "noisy_classifier": model.state_dict(),
            "classifier_config": dataclasses.asdict(model.config),
            "diffusion_config": dataclasses.asdict(diffusion),
            "accuracy_by_t": {str(t): a for t, a in accuracy.items()},
            "train_images": train_images,
        },
    )


def load_noisy_classifier(path: str | os.PathLike) -> tuple[NoisyClassifier, DiffusionConfig]:
    """The classifier of :func:`save_noisy_classifier`, in eval mode, and the diffusion config it was trained for."""
    state = load_checkpoint(path)
    if "noisy_classifier" not in state:
        raise CheckpointError(f"{path} is not a noisy classifier (the shipped one is checkpoints/mnist_noisy_classifier.pt)")
    try:
        config = config_from_dict(NoisyClassifierConfig, state["classifier_config"])
        require_model(NoisyClassifier, config, 1, f"{path}'s classifier")  # before anything is allocated
        model = NoisyClassifier(config)
        model.load_state_dict(state["noisy_classifier"])
        diffusion = config_from_dict(DiffusionConfig, state["diffusion_config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not hold a usable noisy classifier: {' '.join(str(e).split())}") from e
    check_finite({"ema": state["noisy_classifier"]}, str(path))
    return model.eval(), diffusion


def check_matches(classifier: NoisyClassifier, classifier_diffusion: DiffusionConfig, diffusion: DiffusionConfig, chw: tuple) -> None:
    """Refuse a classifier trained for another noise schedule or image shape than the model it would guide."""
    c = classifier.config
    if (c.in_channels, c.image_size, c.image_size) != tuple(chw):
        raise ValueError(f"the classifier reads {(c.in_channels, c.image_size, c.image_size)} images, the model draws {tuple(chw)}")
    mine, theirs = (dataclasses.replace(d, prediction="eps") for d in (classifier_diffusion, diffusion))
    if mine != theirs:
        raise ValueError(f"the classifier was trained for the schedule {classifier_diffusion.schedule} with T={classifier_diffusion.T}, "
                         f"the model uses {diffusion.schedule} with T={diffusion.T}")  # fmt: skip
