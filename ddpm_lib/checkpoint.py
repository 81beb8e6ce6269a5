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
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .diffusion import DiffusionConfig
from .files import atomic_write
from .unet import UNet, UNetConfig

FORMAT, VERSION = "ddpm_lib", 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or not one of ours."""


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a frozen config dataclass; lists become tuples again."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (see the module docstring) to ``path`` atomically."""
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; every failure is a :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects (possibly code), which a ddpm_lib checkpoint never does"
        ) from e
    except Exception as e:  # garbage bytes make the unpickler fail in many ways (KeyError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {' '.join(str(e).split())}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a ddpm_lib checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this ddpm_lib reads version {VERSION}")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[UNet, DiffusionConfig]:
    """The EMA model of a checkpoint, in eval mode on ``device``, and its diffusion config."""
    state = load_checkpoint(path, map_location=device)
    try:
        model = UNet(config_from_dict(UNetConfig, state["model_config"]))
        model.load_state_dict(state["ema"])
        diffusion = config_from_dict(DiffusionConfig, state["diffusion_config"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not hold a usable model: {' '.join(str(e).split())}") from e
    return model.to(device).eval(), diffusion


SHARED_KEYS = ("model_config", "diffusion_config", "train_config", "ema", "step")


def export_ema(source: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the configs, EMA weights and loss history of a training checkpoint, without optimizer or raw weights.

    The result is about a quarter of the size, loads with :func:`load_model` and the CLI's
    --checkpoint, and cannot be resumed. Returns what was written.
    """
    state = load_checkpoint(source)
    missing = [k for k in SHARED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; it is not a training checkpoint")
    kept = (*SHARED_KEYS, "losses", "train_seconds", "machine_seconds")  # the loss history is small: keep it
    shared = {k: state[k] for k in kept if k in state}
    save_checkpoint(out, shared)
    return shared
