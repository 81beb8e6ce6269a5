"""What a job needs against what this machine has: refuse up front, with both numbers, what cannot fit.

A checkpoint that asks for a U-Net of 10^12 weights, or ``sample --num 10^30``, would otherwise
allocate until the machine runs out of memory or disk. :func:`require` compares an estimate
with the memory available now (Linux's MemAvailable, within a cgroup's limit) and the free disk
space beside the output, and raises :class:`ResourceError` (a ValueError) naming the job, what
it needs and what there is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

MODEL_LIMIT = 2**30  # parameters a model may have before its memory is even estimated: 4 GiB of float32 weights


class ResourceError(ValueError):
    """A job would need more memory or disk than this machine has."""


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, "max", or not Linux
        return None


def available_memory() -> int:
    """Bytes of memory this process can still take: MemAvailable, capped by a cgroup v2 limit when there is one."""
    meminfo = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    available = meminfo.get("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(limit - used, 0))
    return available


def free_disk(folder: str | os.PathLike) -> int:
    """Bytes free on the file system that holds ``folder``."""
    return shutil.disk_usage(folder).free


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; beyond TiB the number just grows (3e+21 TiB)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB" if n < 1e6 else f"{n:.2g} TiB"


def require(job: str, memory: float = 0, disk: float = 0, out: str | os.PathLike | None = None) -> None:
    """Raise :class:`ResourceError` if ``job`` needs more than the ``memory`` available or the ``disk``
    free beside the file ``out`` (bytes; floats, so absurd requests do not overflow)."""
    if memory > (have := available_memory()):
        raise ResourceError(f"{job} would need {format_bytes(memory)} of memory; this machine has {format_bytes(have)} available")
    if disk and out is not None and disk > (have := free_disk(Path(out).parent)):
        raise ResourceError(f"{job} would write {format_bytes(disk)}; {Path(out).parent} has {format_bytes(have)} free")


def parameter_count(build: type[nn.Module], config: object) -> int:
    """The parameters ``build(config)`` would have, counted on PyTorch's meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(config).parameters())


def require_model(build: type[nn.Module], config: object, copies: int, what: str) -> int:
    """Refuse ``build(config)`` before allocating it if ``copies`` float32 copies of its weights (1 to sample;
    5 to train: weights, EMA, gradients and AdamW's two moments) would not fit. Returns its parameter count."""
    n = parameter_count(build, config)
    if n > MODEL_LIMIT:
        raise ResourceError(f"{what} has {n:.3g} parameters, more than the {MODEL_LIMIT:,} this library builds")
    require(f"{what} ({n:,} parameters, {copies} float32 copies)", memory=4 * n * copies)
    return n
