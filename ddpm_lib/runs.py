"""A training run from the options a user gives: a new run, one that starts from a trained model, or a resumed one.

Options are a mapping of names to values, as ``python -m ddpm_lib train`` takes them: the fields of
:class:`~ddpm_lib.training.TrainConfig`, :class:`~ddpm_lib.diffusion.DiffusionConfig` and
:class:`~ddpm_lib.unet.UNetConfig`, and ``dataset``, ``data_root``, ``image_size``, ``conditional``,
``init`` (a checkpoint to start from) and ``epochs`` (instead of ``steps``). A missing or None value
means the default for a new run and "as saved" for a resumed one. Every option is checked, against the
others and against a saved run, before the data is loaded. Errors are :class:`RunError` (a ValueError)
whose message names each option as its command-line flag (``label_dropout`` is ``--label-dropout``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, model_from_state
from .data import dataset_info, get_dataset, num_classes
from .diffusion import DiffusionConfig
from .training import TrainConfig, Trainer, epochs_to_steps, max_workers, saved_configs
from .unet import UNetConfig

# options a resumed run may change (the rest are fixed by the saved run); besides these: steps, epochs, device, data_root
RESUMABLE = (
    "lr",
    "lr_schedule",
    "warmup_steps",
    "ema_decay",
    "loss_weighting",
    "precision",
    "sample_every",
    "checkpoint_every",
    "snapshot_every",
    "num_workers",
    "label_dropout",
)


class RunError(ValueError):
    """Options that cannot make a run; the message says which and what to do instead."""


def flag(name: str) -> str:
    """The command-line flag of option ``name``: label_dropout -> --label-dropout."""
    return "--" + name.replace("_", "-")


def given(options: Mapping[str, Any], cls: type) -> dict:
    """The fields of config class ``cls`` that ``options`` sets (to something other than None)."""
    return {f.name: options[f.name] for f in dataclasses.fields(cls) if options.get(f.name) is not None}


def new_run(options: Mapping[str, Any], device: str | torch.device | None = None) -> Trainer:
    """A fresh run (from ``options["init"]``'s EMA weights when given) on ``device`` (None: cuda when available);
    every config is validated before the data is loaded."""
    dataset_name = options.get("dataset") or TrainConfig.dataset
    channels, native = dataset_info(dataset_name)
    size = options.get("image_size") or native
    if size is None:
        raise RunError("--dataset folder needs --image-size")
    conditional, init_path = bool(options.get("conditional")), options.get("init")
    if options.get("label_dropout") is not None and not conditional:
        raise RunError("--label-dropout needs --conditional")
    labels = {"num_classes": num_classes(dataset_name) if conditional else 0}
    if init_path:
        init = load_checkpoint(init_path)
        source, diffusion_config = model_from_state(init, init_path)
        model_config = source.config
        taken = [flag(name) for name in {**given(options, UNetConfig), **given(options, DiffusionConfig)} if name != "image_size"]
        if taken:
            raise RunError(f"--init takes the U-Net and diffusion settings from {init_path}; drop {', '.join(taken)}")
        if (model_config.in_channels, model_config.image_size) != (channels, size):
            got = f"{model_config.in_channels} x {model_config.image_size} x {model_config.image_size}"
            raise RunError(f"--init {init_path} is a model of {got} images, not {channels} x {size} x {size} ({dataset_name})")
        model_config = dataclasses.replace(model_config, **labels)
    else:
        shape = {"attention_resolutions": (), **given(options, UNetConfig), "image_size": size, **labels}
        model_config = UNetConfig(in_channels=channels, **shape)
        if options.get("attention_resolutions") is None:  # default: attention at the lowest resolution
            model_config = dataclasses.replace(model_config, attention_resolutions=tuple(model_config.resolutions[-1:]))
        diffusion_config = DiffusionConfig(**given(options, DiffusionConfig))
    hflip = dataset_name in ("cifar10", "folder")  # photos may be mirrored, digits may not
    train_config = TrainConfig(**{**given(options, TrainConfig), "dataset": dataset_name, "hflip": hflip})
    dataset = get_dataset(dataset_name, options.get("data_root"), True, options.get("image_size"), hflip, in_memory=not hflip)
    if options.get("epochs"):
        train_config = dataclasses.replace(train_config, steps=epochs_to_steps(options["epochs"], len(dataset), train_config.batch_size))
    trainer = Trainer(model_config, diffusion_config, train_config, dataset, device)
    if init_path:
        try:
            trainer.init_weights(init["ema"])
        except (RuntimeError, ValueError) as e:
            raise RunError(f"--init {init_path} does not fit this run: {' '.join(str(e).split())}") from None
    return trainer


def resumed_run(out: str | Path, options: Mapping[str, Any], device: str | torch.device | None = None) -> Trainer:
    """The run saved in ``out``, with the options in :data:`RESUMABLE` (and steps or epochs) applied and any
    other option that differs from the saved run refused."""
    out = Path(out)
    if not out.exists():
        raise RunError(f"--resume: {out} does not exist")
    if options.get("init"):
        raise RunError("--init starts a new run; --resume continues the one in --out (drop --init)")
    state = load_checkpoint(out)
    workers = state["train_config"].get("num_workers") if isinstance(state.get("train_config"), dict) else None
    most = max_workers()
    if options.get("num_workers") is None and isinstance(workers, int) and workers > most:
        raise RunError(f"{out} was saved with --num-workers {workers:,}, more than the {most} cores here; pass --num-workers 0 ... {most}")
    saved = saved_configs(state, out, {name: options[name] for name in RESUMABLE if options.get(name) is not None})
    fixed = {**given(options, TrainConfig), **given(options, DiffusionConfig), **given(options, UNetConfig)}
    differ = []
    for name, value in fixed.items():
        if name in RESUMABLE or name == "steps":
            continue
        was = next(getattr(config, name) for config in saved if hasattr(config, name))  # image_size: the model's
        if value != was:
            differ.append(f"{flag(name)} (saved: {','.join(map(str, was)) if isinstance(was, tuple) else was})")
    if options.get("conditional") and not saved[0].num_classes:
        differ.append("--conditional (saved: an unconditional model)")
    if differ:
        raise RunError(f"--resume cannot change {', '.join(differ)}; drop these flags, or start a new run with another --out")
    step, steps = state.get("step"), options.get("steps")  # from_state checks the step; refuse too few before the data is loaded
    if isinstance(step, int) and steps is not None and steps <= step:
        raise RunError(f"--steps {steps} is not above the step {out} has reached ({step}); pass more steps to train on")
    changes = {name: options[name] for name in (*RESUMABLE, "steps") if options.get(name) is not None}
    trainer = Trainer.from_state(state, out, device=device, data_root=options.get("data_root"), **changes)
    step = trainer.step
    if options.get("epochs"):
        steps = epochs_to_steps(options["epochs"], len(trainer.dataset), trainer.config.batch_size)
        if steps <= step:
            raise RunError(f"--epochs {options['epochs']} is {steps} steps, not above the step {out} has reached ({step})")
        trainer.config = dataclasses.replace(trainer.config, steps=steps)
    if trainer.config.steps <= step:
        raise RunError(f"the run in {out} is complete ({step} of {trainer.config.steps} steps); pass --steps above {step} to train on")
    return trainer
