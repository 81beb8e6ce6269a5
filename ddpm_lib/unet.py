"""The noise-prediction network: a U-Net with a sinusoidal time embedding (Ho et al. 2020, Sec. 4, App. B).

Read top-down: the time embedding, the three building blocks (residual block, self-attention,
resampling), then the U-Net that stacks them. Images are (B, C, H, W) in [-1, 1]; t is a (B,)
tensor of 0-based timesteps; y, for a class-conditional U-Net, a (B,) tensor of class labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Far beyond any pixel-space diffusion model, yet refused before anything is built: a checkpoint's config is untrusted input.
MAX_LEVELS = 10
LIMITS = {
    "in_channels": 64,
    "image_size": 4096,
    "patch_size": 4096,
    "base_channels": 4096,
    "channel_mults": 64,
    "num_res_blocks": 64,
    "num_groups": 1024,
    "num_heads": 1024,
    "num_classes": 1_000_000,
}


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1  # image channels: 1 for MNIST, 3 for RGB
    image_size: int = 28  # height = width of the images; divisible by patch_size * 2 ** (len(channel_mults) - 1)
    patch_size: int = 1  # fold each p x p patch of pixels into channels first (2: MNIST's 28 x 28 becomes 14 x 14; see UNet)
    base_channels: int = 16  # channels at the U-Net's full resolution, where convolutions cost the most
    channel_mults: tuple[int, ...] = (1, 2, 4)  # channels per resolution = base * mult: 16, 32, 64 at 28, 14, 7
    num_res_blocks: int = 1  # residual blocks per resolution on the way down (2 trains 1.6x slower on CPU)
    attention_resolutions: tuple[int, ...] = (7,)  # resolutions (in pixels) with self-attention; the middle always has it
    dropout: float = 0.0  # dropout inside residual blocks (Ho et al.: 0.1 on CIFAR-10; on MNIST it slowed learning: docs/experiments.md)
    num_groups: int = 8  # GroupNorm groups; must divide every channel count
    num_heads: int = 4  # self-attention heads
    num_classes: int = 0  # class labels the U-Net is conditioned on (0: unconditional); label num_classes means "no label"

    def __post_init__(self) -> None:
        for name in ("channel_mults", "attention_resolutions"):  # a checkpoint's config is untrusted: types first
            if not isinstance(getattr(self, name), tuple) or not all(isinstance(v, int) for v in getattr(self, name)):
                raise ValueError(f"{name} must be a tuple of whole numbers, got {getattr(self, name)!r}")
        levels = len(self.channel_mults)
        if not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"channel_mults must name 1 to {MAX_LEVELS} resolutions, got {levels}")
        for name in ("in_channels", "image_size", "patch_size", "base_channels", "num_res_blocks", "num_groups", "num_heads"):
            if not isinstance(getattr(self, name), int) or not 1 <= getattr(self, name) <= LIMITS[name]:
                raise ValueError(f"{name} must be a whole number from 1 to {LIMITS[name]:,}, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or not 0 <= self.num_classes <= LIMITS["num_classes"]:
            raise ValueError(
                f"num_classes must be a whole number from 0 (unconditional) to {LIMITS['num_classes']:,}, got {self.num_classes!r}"
            )
        if not all(isinstance(m, int) and 1 <= m <= LIMITS["channel_mults"] for m in self.channel_mults):
            raise ValueError(f"channel_mults must be whole numbers from 1 to {LIMITS['channel_mults']}, got {self.channel_mults}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:  # also refuses NaN
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size must be a positive divisor of image_size {self.image_size}, got {self.patch_size}")
        if (self.image_size // self.patch_size) % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {self.image_size} / patch_size {self.patch_size} cannot be halved {levels - 1} times; "
                f"use an image size divisible by {self.patch_size * 2 ** (levels - 1)} or fewer channel_mults"
            )
        for mult in self.channel_mults:
            channels = self.base_channels * mult
            if channels % self.num_groups or channels % self.num_heads:
                raise ValueError(f"{channels} channels are not divisible by num_groups={self.num_groups} and num_heads={self.num_heads}")
        bad = [r for r in self.attention_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not resolutions of this U-Net; valid: {self.resolutions}")

    @property
    def resolutions(self) -> list[int]:
        """The side of the feature maps at each level, from the top: [28, 14, 7] for the default."""
        return [self.image_size // self.patch_size // 2**i for i in range(len(self.channel_mults))]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, as used by Ho et al.).

    Convention: for a (B,) tensor of 0-based timesteps t (used as they are, not rescaled) and
    frequencies w_i = max_period ** (-i / half) for i = 0 ... half-1 (half = dim // 2), the
    embedding is [sin(t w_0), ..., sin(t w_{half-1}), cos(t w_0), ..., cos(t w_{half-1})],
    shape (B, dim). So w_0 = 1 and t = 0 embeds as half zeros then half ones.
    """
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected time embedding, GroupNorm -> SiLU -> dropout -> conv, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # time embedding, broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H * W positions, with a residual connection.

    Under CPU bf16 autocast the attention is written out (two matmuls and a softmax): for these
    small matrices PyTorch's fused kernel is several times slower there; everywhere else it is faster.
    """

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, H*W, C/heads)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            weights = (q @ k.transpose(-1, -2) * (C // self.heads) ** -0.5).softmax(dim=-1)  # (B, heads, H*W, H*W)
            h = weights @ v  # (B, heads, H*W, C/heads)
        else:
            h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: a convolution, then nearest-neighbour upsampling.

    Ho et al. convolve after upsampling; convolving before it costs a quarter of the compute
    (the U-Net trains about 1.3x faster on CPU) and the next residual block smooths the 2x2 blocks.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2, mode="nearest")


class Level(nn.Module):
    """A residual block, optionally followed by self-attention: one layer of the U-Net."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, attention: bool, cfg: UNetConfig):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.num_groups)
        self.attn = SelfAttention(out_ch, cfg.num_heads, cfg.num_groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """model(x_t, t) or model(x_t, t, y) -> a tensor shaped like x_t (the predicted eps, x0 or v).

    With ``num_classes`` K > 0 the U-Net is class-conditional (Ho & Salimans 2021): a learned
    embedding of the label y in 0 ... K-1, or of the extra "no label" class K (the default when
    y is None), is added to the time embedding, so every residual block sees both.

    With ``patch_size`` p > 1, ``patchify`` first folds each p x p patch into p * p channels and
    the head unfolds them again, so the U-Net itself runs at 1/p the resolution, the way DiT and
    Hoogeboom et al. (2023) cut the cost of large feature maps. On MNIST, p = 2 with 32 and 64
    channels trains about 1.5x faster per step than the default but needs more than twice the steps.

    Down path: at each resolution ``num_res_blocks`` layers, then a downsample (except at the
    lowest); every output is kept as a skip. Middle: res block, attention, res block. Up path:
    ``num_res_blocks + 1`` layers per resolution, each concatenating one skip, then an upsample.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)  # the last row: "no label"
        self.patchify = nn.PixelUnshuffle(cfg.patch_size)
        self.stem = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, res = [ch], cfg.resolutions[0]
        for i, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(ch, cfg.base_channels * mult, emb_dim, res in cfg.attention_resolutions, cfg))
                ch = cfg.base_channels * mult
                skips.append(ch)
            if i < len(cfg.channel_mults) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2

        self.mid1 = ResBlock(ch, ch, emb_dim, cfg.dropout, cfg.num_groups)
        self.mid_attn = SelfAttention(ch, cfg.num_heads, cfg.num_groups)
        self.mid2 = ResBlock(ch, ch, emb_dim, cfg.dropout, cfg.num_groups)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Level(ch + skips.pop(), cfg.base_channels * mult, emb_dim, res in cfg.attention_resolutions, cfg))
                ch = cfg.base_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.head = nn.Sequential(
            nn.GroupNorm(cfg.num_groups, ch),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.in_channels * cfg.patch_size**2, 3, padding=1),
            nn.PixelShuffle(cfg.patch_size),  # unfold the channels of each patch back into p x p pixels
        )
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))  # (B, 4 * base)
        if self.config.num_classes:
            if y is None:
                y = torch.full_like(t, self.config.num_classes)  # the "no label" class
            emb = emb + self.label_emb(y)  # (B, 4 * base)
        elif y is not None:
            raise ValueError("this U-Net is unconditional (num_classes=0): it takes no class labels")
        h = self.stem(self.patchify(x))  # (B, C * p * p, H / p, W / p) -> (B, base, H / p, W / p)
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)  # (B, C_low, H_low, W_low)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Upsample) else layer(torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)  # (B, in_channels, H, W)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_shapes(model: UNet, x: torch.Tensor, t: torch.Tensor) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer name, output shape, parameter count) for every top-level layer, in the order a forward pass runs them."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        is_layer = (
            name in ("time_mlp", "stem", "mid1", "mid_attn", "mid2", "head")
            or (name == "patchify" and model.config.patch_size > 1)
            or (name.count(".") == 1 and name.split(".")[0] in ("down", "up"))
        )
        if is_layer:
            hooks.append(
                module.register_forward_hook(lambda m, args, out, name=name: rows.append((name, tuple(out.shape), count_parameters(m))))
            )
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return rows
