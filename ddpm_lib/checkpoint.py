"""Checkpoints: one dict of tensors, numbers, strings and lists, written atomically, read with weights_only=True.

Loading never unpickles arbitrary objects, so a checkpoint cannot run code. Keys:

    format, version        "ddpm_lib", 1
    model_config           UNetConfig as a dict
    diffusion_config       DiffusionConfig as a dict
    train_config           TrainConfig as a dict (training checkpoints only)
    ema                    state dict of the EMA weights (used for sampling)
    model, optimizer       raw weights and AdamW state (training checkpoints only)
    step, ema_updates      optimizer steps taken, EMA updates made
    train_seconds          wall time spent training, over every resumed part of the run
    machine_seconds        that time by the CPU or GPU it ran on ({device name: seconds})
    losses                 the training loss of every step
    rng                    random-number-generator states, so a resumed run continues exactly
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .diffusion import DiffusionConfig
from .files import OutputPathError, check_writable, write_atomic
from .unet import UNet, UNetConfig

FORMAT, VERSION = "ddpm_lib", 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, not one of ours, or holds unusable weights."""


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a frozen config dataclass; lists become tuples again."""
    if not isinstance(d, dict):
        raise TypeError(f"its {cls.__name__} is a {type(d).__name__}, not a dict")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    if not isinstance(state_dict, dict):
        return []
    return [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state: dict[str, Any], where: str) -> None:
    """Raise a :class:`CheckpointError` if the weights of ``state`` ("model", "ema") hold NaN or inf."""
    for key in ("model", "ema"):
        bad = nonfinite_tensors(state.get(key) or {})
        if bad:
            raise CheckpointError(
                f"{where} has NaN or inf in {len(bad)} of its {len(state[key])} {key} tensors (e.g. {bad[0]}): "
                "the training run diverged; use an earlier checkpoint or snapshot"
            )


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (see the module docstring) to ``path`` atomically; weights with NaN or inf are refused."""
    check_finite(state, "the state to save")
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    write_atomic(path, buffer.getbuffer())


MAGIC = {  # first bytes of the files most often passed by mistake
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x93NUMPY": "a NumPy array (.npy)",
    b"\x1f\x8b": "a gzip archive",
}


def describe_file(path: Path) -> str:
    """What a file that is not a readable checkpoint actually is, in a few words."""
    if path.is_dir():
        return "a folder, not a file"
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty (0 bytes)"
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, but not a complete PyTorch file (truncated or corrupt?)"
    try:
        head.decode("utf-8")
        return f"a text file starting {head[:40].decode('utf-8', 'replace').splitlines()[0]!r}"
    except UnicodeDecodeError:
        return f"{path.stat().st_size} bytes that are not a PyTorch file (first bytes: {head[:8].hex(' ')})"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; every failure is a :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(f"{path} is not a checkpoint: it is {describe_file(path)}")
    with open(path, "rb") as f:
        head = f.read(4)
    pytorch = head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a")  # torch.save's zip format, or its legacy pickle (magic number first)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not pytorch:
            raise CheckpointError(f"{path} is not a checkpoint: it is {describe_file(path)}") from e
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects other than tensors (possibly code), "
            "which a ddpm_lib checkpoint never does"
        ) from e
    except Exception as e:  # garbage bytes make the unpickler fail in many ways (KeyError, EOFError, RuntimeError, ...)
        if not pytorch:
            raise CheckpointError(f"{path} is not a checkpoint: it is {describe_file(path)}") from e
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {' '.join(str(e).split())}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a ddpm_lib checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this ddpm_lib reads version {VERSION}")
    return state


def model_from_state(state: dict[str, Any], path: str | os.PathLike) -> tuple[UNet, DiffusionConfig]:
    """The EMA model (on the CPU, in eval mode) and diffusion config of a loaded checkpoint, or a
    :class:`CheckpointError` if its configs or weights are unusable."""
    try:
        model = UNet(config_from_dict(UNetConfig, state["model_config"]))
        model.load_state_dict(state["ema"])
        diffusion = config_from_dict(DiffusionConfig, state["diffusion_config"])
    except KeyError as e:
        raise CheckpointError(f"{path} does not hold a usable model: it lacks {e}") from e
    except (TypeError, RuntimeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} does not hold a usable model: {' '.join(str(e).split())}") from e
    check_finite({"ema": state["ema"]}, str(path))
    return model.eval(), diffusion


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[UNet, DiffusionConfig]:
    """The EMA model of a checkpoint, in eval mode on ``device``, and its diffusion config."""
    model, diffusion = model_from_state(load_checkpoint(path), path)
    return model.to(device), diffusion


SHARED_KEYS = ("model_config", "diffusion_config", "train_config", "ema", "step")


def export_ema(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write the configs, EMA weights and loss history of a training checkpoint, without optimizer or raw weights.

    The result is about a quarter of the size, loads with :func:`load_model` and the CLI's
    --checkpoint, and cannot be resumed. An existing ``out`` is refused unless ``overwrite``
    (it may be another run's training state); the model is checked to load before anything
    is written. Returns what was written.
    """
    if Path(out).exists() and not overwrite:
        raise OutputPathError(f"{out} exists; export never replaces a file unless told to (overwrite=True, the CLI's --force)")
    check_writable(out)
    state = load_checkpoint(source)
    missing = [k for k in SHARED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; it is not a training checkpoint")
    model_from_state(state, source)  # usable: the configs and weights fit together and are finite
    kept = (*SHARED_KEYS, "losses", "train_seconds", "machine_seconds")  # the loss history is small: keep it
    shared = {k: state[k] for k in kept if k in state}
    save_checkpoint(out, shared)
    return shared
