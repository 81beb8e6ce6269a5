"""Devices and precision: which device to run on, what it is called, and whether bf16 autocast pays there.

Training, sampling and the scripts all ask these questions; none of them should have to import
the others to do so.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device, checked to exist on this machine (None: :func:`default_device`).

    A name torch does not know, or a CUDA/MPS device this machine lacks, is a ValueError that
    says what is available, raised before any work.
    """
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; valid: cpu, cuda, cuda:N, mps") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} is unavailable: this machine has no usable CUDA GPU; use cpu")
        if d.index is not None and d.index >= count:
            raise ValueError(f"device {str(device)!r} is unavailable: this machine has {count} CUDA GPU(s), cuda:0 ... cuda:{count - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is unavailable on this machine; use cpu")
    elif d.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; valid: cpu, cuda, cuda:N, mps")
    return d


def cpuinfo() -> str:
    """Linux's /proc/cpuinfo ("" elsewhere): the CPU's model name and instruction-set flags."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def device_name(device: torch.device | str) -> str:
    """The model name of the GPU, or of the CPU with the threads torch uses: timings mean little
    without it, and build machines differ from day to day."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = [line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {torch.get_num_threads()} threads"


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds up training here: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX
    instructions (on other CPUs bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpuinfo().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve a PRECISIONS choice: "bf16" always, "auto" where fast_bf16(device), "fp32" never."""
    return precision == "bf16" or (precision == "auto" and fast_bf16(device))
