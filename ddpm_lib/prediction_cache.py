"""The judge's predictions of large image sets, kept on disk between runs and used only once checked.

:func:`ddpm_lib.classifier.predict` scores the MNIST test set (10,000 images, 12 s on 2 CPU cores)
in every notebook, script and test that compares samples with it. :func:`cached` keeps the result in
:func:`cache_dir`, named by the SHA-256 of the classifier's weights and of the images, as
torch-fidelity and clean-fid keep theirs.

A cache file is input, not truth. It is opened as a checkpoint is (``checkpoint.load_checkpoint``:
a regular file, never a FIFO or a device; torch.save's zip format read with ``weights_only``; no
compressed bomb) and refused above the size its rows can take. What it holds must then match what
it claims (:func:`problem`): float32 features (N, 128) and probabilities (N, 10) for exactly these N
images, finite, probabilities that sum to 1, and the SHA-256 of their bytes as stored with them,
which any damage to the file changes. Last, :data:`SPOT_CHECKS` rows drawn at random are computed
again and compared: a file that was altered on purpose, its digest recomputed, is caught whenever
any of those rows is among the altered ones (a shift of every value always is). Anything that fails
is computed afresh, said in one line on stderr, and the file replaced atomically; a cache that
cannot be written only costs the time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

SPOT_CHECKS = 16  # rows computed again on every read and compared with the file's
WIDTHS = {"features": 128, "probs": 10}  # the columns of each tensor a cache file holds
Compute = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images (n, 1, 28, 28) -> features (n, 128), probs (n, 10)


def cache_dir() -> Path:
    """Where the predictions of large image sets are kept: $DDPM_CACHE, else ~/.cache/ddpm_lib."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm_lib")


def cache_path(weights: Iterable[torch.Tensor], images: torch.Tensor) -> Path:
    """The file of the predictions of ``images`` by a classifier with ``weights`` (its state dict's values)."""
    return cache_dir() / f"mnist_classifier_predictions_{digest([*weights, images])[:32]}.pt"


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """The SHA-256 of the tensors' bytes, in order (hex)."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BadCache(Exception):
    """A cache file that cannot stand for the predictions it is named after; the message says why, in a few words."""


def cached(path: Path, images: torch.Tensor, compute: Compute) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute(images)``, read from ``path`` when it holds a checked result for them, else computed and written there."""
    if path.exists() or path.is_symlink():
        try:
            return read(path, images, compute)
        except BadCache as e:
            print(f"ddpm_lib: ignored the cached predictions {path} ({e}); computing them again", file=sys.stderr)
    features, probs = compute(images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"features": features, "probs": probs, "count": len(images), "sha256": digest([features, probs])})
    except OSError:
        pass  # a read-only home: no cache, the same result
    return features, probs


def max_bytes(count: int) -> int:
    """The largest a cache file of ``count`` rows may be: its float32 rows and 1 MiB for the archive's own records."""
    return 4 * count * sum(WIDTHS.values()) + 2**20


def read(path: Path, images: torch.Tensor, compute: Compute) -> tuple[torch.Tensor, torch.Tensor]:
    """The features and probabilities in the cache file ``path``, once checked to stand for ``compute(images)``
    (see the module doc); :class:`BadCache` otherwise."""
    n = len(images)
    if path.is_file() and path.stat().st_size > max_bytes(n):
        raise BadCache(f"{path.stat().st_size:,} bytes, more than {n:,} rows take")
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise BadCache(str(e).removeprefix(f"{path} ")) from None
    tensors = [state.get(name) for name in WIDTHS]
    for (name, width), tensor in zip(WIDTHS.items(), tensors, strict=True):
        if not torch.is_tensor(tensor) or tensor.dtype != torch.float32 or tuple(tensor.shape) != (n, width):
            what = f"{tuple(tensor.shape)} {tensor.dtype}" if torch.is_tensor(tensor) else f"a {type(tensor).__name__}"
            raise BadCache(f"its {name} are {what}, not ({n}, {width}) float32")
        if not torch.isfinite(tensor).all():
            raise BadCache(f"its {name} hold NaN or inf")
    if state.get("count") != n or state.get("sha256") != digest(tensors):
        raise BadCache("its contents do not match the digest stored with them")
    features, probs = (tensor.clone() for tensor in tensors)  # out of the memory map: the file may change later
    if not torch.allclose(probs.sum(dim=1), torch.ones(n), atol=1e-4):
        raise BadCache("its probabilities do not sum to 1")
    draw = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))  # not the global stream: nothing else shifts
    rows = torch.randperm(n, generator=draw)[:SPOT_CHECKS]  # a new draw each time: which rows, a forger cannot know
    fresh = compute(images[rows])
    if not all(torch.allclose(a[rows], b, rtol=1e-4, atol=1e-4) for a, b in zip((features, probs), fresh, strict=True)):
        raise BadCache(f"{SPOT_CHECKS} rows computed again differ from its own")
    return features, probs
