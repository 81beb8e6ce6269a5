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
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch

from .denoiser import Denoiser
from .diffusion import DiffusionConfig
from .files import OutputPathError, check_writable, same_file, write_atomic
from .resources import require_model
from .sampling import check_network
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


NOT_FILES = (  # what else a path can name; each is refused without opening it (opening a FIFO waits for a writer)
    (stat.S_ISDIR, "a folder, not a file"),
    (stat.S_ISFIFO, "a named pipe (FIFO), not a file"),
    (stat.S_ISCHR, "a character device, not a file"),
    (stat.S_ISBLK, "a block device, not a file"),
    (stat.S_ISSOCK, "a socket, not a file"),
)
TEXT_CONTROLS = set(range(32)) - {9, 10, 12, 13}  # bytes that never occur in text; tab, newlines and form feed do


def not_a_file(path: Path) -> str | None:
    """What ``path`` names if it is not a regular file ("a named pipe (FIFO), not a file", ...), from its
    status alone; None for a regular file."""
    mode = path.stat().st_mode
    return next((kind for test, kind in NOT_FILES if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def describe_file(path: Path) -> str:
    """What a file that is not a readable checkpoint actually is, in a few words."""
    kind = not_a_file(path)
    if kind is not None:
        return kind
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty (0 bytes)"
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    if head.startswith(ZIP_MAGIC):
        return "a zip archive, but not a complete PyTorch file (truncated or corrupt?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or TEXT_CONTROLS & set(head):
        return f"{path.stat().st_size:,} bytes of binary data, not a PyTorch file (first bytes: {head[:8].hex(' ')})"
    return f"a text file starting {text[:40].splitlines()[0]!r}"


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6: a zip archive of uncompressed records
LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # the pickle stream of PyTorch before 1.6, which ddpm_lib never writes
ARCHIVE_SLACK = 2**20  # bytes an archive may declare beyond its own size (zip headers and alignment, a little metadata)


def declared_size(path: Path) -> int:
    """The bytes a zip archive's records say they hold once read: its central directory alone is read."""
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; every failure is a :class:`CheckpointError` saying what is wrong.

    Nothing in it can run code (``weights_only=True``), and refusing a hostile file costs little
    memory: only files in torch.save's zip format are read, an archive that declares more data
    than the file holds (a compressed "bomb": torch.save never compresses) is refused from its
    directory alone, and the tensors are memory-mapped (``mmap=True``) rather than read in.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not_a_file(path) is not None or path.stat().st_size == 0:
        raise CheckpointError(f"{path} is not a checkpoint: it is {describe_file(path)}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == LEGACY_MAGIC:
        raise CheckpointError(f"{path} is a PyTorch file in the format of PyTorch before 1.6, which a ddpm_lib checkpoint never is")
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a checkpoint: it is {describe_file(path)}")
    size = path.stat().st_size
    try:
        declared = declared_size(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {' '.join(str(e).split())}") from e
    if declared > size + ARCHIVE_SLACK:
        raise CheckpointError(
            f"refused to load {path}: it declares {declared / 2**20:,.0f} MiB of data in a file of {size / 2**20:,.1f} MiB "
            "(a compressed archive; torch.save writes checkpoints uncompressed)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects other than tensors (possibly code), "
            "which a ddpm_lib checkpoint never does"
        ) from e
    except Exception as e:  # garbage bytes make the unpickler fail in many ways (KeyError, EOFError, RuntimeError, ...)
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
        config = config_from_dict(UNetConfig, state["model_config"])
        diffusion = config_from_dict(DiffusionConfig, state["diffusion_config"])  # validates T before the schedule is built
        require_model(UNet, config, 1, f"{path}'s U-Net")  # before anything is allocated
        model = UNet(config)
        model.load_state_dict(state["ema"])
    except KeyError as e:
        raise CheckpointError(f"{path} does not hold a usable model: it lacks {e}") from e
    except (TypeError, RuntimeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} does not hold a usable model: {' '.join(str(e).split())}") from e
    check_finite({"ema": state["ema"]}, str(path))
    return model.eval(), diffusion


def sound_model(state: dict[str, Any], path: str | os.PathLike) -> tuple[UNet, DiffusionConfig]:
    """:func:`model_from_state`, and its network's predictions checked (``sampling.check_network``): a run
    that blew up with finite weights, or a network that predicts the same for every input, is refused."""
    model, diffusion = model_from_state(state, path)
    check_network(Denoiser(model, diffusion), (model.config.in_channels, model.config.image_size, model.config.image_size))
    return model, diffusion


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[UNet, DiffusionConfig]:
    """The EMA model of a checkpoint, in eval mode on ``device``, and its diffusion config."""
    model, diffusion = model_from_state(load_checkpoint(path), path)
    return model.to(device), diffusion


def check_output(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> None:
    """Before an export of ``source``: ``out`` can be written, is not ``source`` itself (by any name, link
    or hard link), and is replaced only if ``overwrite``; an :class:`OutputPathError` says which fails."""
    out = check_writable(out)
    if same_file(source, out):
        raise OutputPathError(f"{out} is the checkpoint being exported; an export never replaces its source")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{out} exists (it may be another run's checkpoint); pass --force (overwrite=True) to replace it")


SHARED_KEYS = ("model_config", "diffusion_config", "train_config", "ema", "step")


def export_ema(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write the configs, EMA weights and loss history of a training checkpoint, without optimizer or raw weights.

    The result is about a quarter of the size, loads with :func:`load_model` and the CLI's
    --checkpoint, and cannot be resumed. An existing ``out`` is refused unless ``overwrite``
    (it may be another run's training state); the model is checked to load before anything
    is written. Returns what was written.
    """
    check_output(source, out, overwrite)
    state = load_checkpoint(source)
    missing = [k for k in SHARED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; it is not a training checkpoint")
    sound_model(state, source)  # usable: the configs and weights fit together, are finite and predict sound values
    kept = (*SHARED_KEYS, "losses", "train_seconds", "machine_seconds")  # the loss history is small: keep it
    shared = {k: state[k] for k in kept if k in state}
    save_checkpoint(out, shared)
    return shared
