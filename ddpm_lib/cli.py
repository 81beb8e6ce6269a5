"""python -m ddpm_lib train | export | sample | gif | nll: the course's library from the shell.

Every failure a user can cause (a bad argument, a missing or corrupt checkpoint, an
unwritable output, a device this machine lacks) ends with a one-line message on stderr and exit
status 2, before any long work, and no traceback. A training run that diverges stops with exit
status 3, and Ctrl-C saves the checkpoint and exits with 130 (see docs/cli.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .checkpoint import CheckpointError, export_ema, load_checkpoint, load_model, model_from_state
from .data import DATASETS, DatasetNotFoundError, ImageFiles, dataset_info, get_dataset, num_classes, skipped_summary
from .denoiser import Denoiser, guided
from .devices import device_name, resolve_device, use_bf16
from .diffusion import PREDICTIONS, DiffusionConfig
from .divergence import DivergenceError
from .files import OutputPathError, check_writable, exclusive_lock, write_atomic
from .guidance import DEFAULT_CLASSIFIER_SCALE, DEFAULT_GUIDANCE, class_blocks
from .likelihood import Bound, bound_table, variational_bound
from .noisy_classifier import check_matches, load_noisy_classifier
from .resources import format_bytes, require
from .sampling import VARIANCES, check_network, check_samples, check_trajectory, sample, sample_loop
from .schedules import SCHEDULES
from .solvers import SOLVERS, make_solver
from .training import (
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    PRECISIONS,
    TrainConfig,
    Trainer,
    epochs_to_steps,
    saved_configs,
)
from .unet import UNetConfig
from .viz import GIF_MAX_MS, auto_scale, check_levels, save_grid, save_trajectory_gif, to_uint8


class UsageError(Exception):
    """A bad command line; the message is shown as is (exit status 2)."""


class Diverged(Exception):
    """Training diverged; the message says what was kept and what to try (exit status 3)."""


class Interrupted(Exception):
    """Ctrl-C; the message says what was saved (exit status 130)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


INT64 = 2**63 - 1  # the largest whole number PyTorch takes: every count on the command line stays below it
SEEDS = 2**32  # seeds are 0 ... 2^32 - 1: seeded streams of ranks and epochs are derived from them without overflow


def whole_number(text: str, low: int, high: int | None = INT64) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high:,}, got {text}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def nonnegative_int(text: str) -> int:
    return whole_number(text, 0)


def image_count(text: str) -> int:
    return whole_number(text, 1, None)  # no bound here: the memory and disk it needs are checked, and said, before sampling


def seed(text: str) -> int:
    return whole_number(text, 0, SEEDS - 1)


def gif_duration(text: str) -> int:
    return whole_number(text, 1, GIF_MAX_MS)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def grey_levels(text: str) -> int:
    value = positive_int(text)
    try:
        check_levels(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def label_list(text: str) -> list[int] | str:
    """--label: 'all', or one or more class numbers separated by commas."""
    if text.strip().lower() == "all":
        return "all"
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        labels = []
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"must be a class number >= 0, a comma-separated list of them, or 'all'; got {text!r}")
    return labels


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(positive_int(v.strip()) for v in text.split(",") if v.strip())


# train flags that --resume may change (the rest are fixed by the saved run); besides these: --steps, --epochs, --device, --data-root
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


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


TRAIN_EPILOG = (
    "Exit status: 0 done; 2 a bad input, with a one-line message before any work; 3 training blew up (the last "
    "checkpoint, written before it, is kept); 130 Ctrl-C (saved). Under torchrun every rank ends so, but torchrun itself "
    "exits 1 and prints its own report, whose 'exitcode' and 'traceback' lines give each rank's status and message "
    "(docs/cli.md, 'Under torchrun')."
)


def build_parser() -> Parser:
    parser = Parser(prog="python -m ddpm_lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    resumable = ", ".join(flag(name) for name in ("steps", "epochs", *RESUMABLE, "device", "data_root"))
    t = sub.add_parser(
        "train",
        help="train a U-Net on a dataset and write a checkpoint",
        description=f"Train a U-Net and write a checkpoint. With --resume, only {resumable} may change; "
        "other flags must match the saved run or are refused.",
        epilog=TRAIN_EPILOG,
    )
    d, m, c = DiffusionConfig, UNetConfig, TrainConfig
    # Flags default to None, meaning "the config's default" for a new run and "as saved" with --resume.
    t.add_argument("--dataset", choices=list(DATASETS), help=f"(default: {c.dataset})")
    t.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data); for --dataset folder, the image folder")
    t.add_argument("--image-size", type=positive_int, help="resize and crop images to this size (default: the dataset's own)")
    t.add_argument("--schedule", choices=list(SCHEDULES), help=f"(default: {d.schedule})")
    t.add_argument("--T", type=positive_int, help=f"diffusion steps (default: {d.T})")
    t.add_argument("--prediction", choices=PREDICTIONS, help=f"(default: {d.prediction})")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help=f"optimizer steps in total (default: {c.steps})")
    length.add_argument("--epochs", type=positive_int, help="passes over the training set in total, instead of --steps")
    t.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"images per optimizer step over all ranks: under torchrun each of N ranks takes batch-size / N (default: {c.batch_size})",
    )
    t.add_argument(
        "--lr", type=finite_float, help=f"peak learning rate for that global batch, on any number of ranks, > 0 (default: {c.lr})"
    )
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, help=f"after warm-up: cosine decay to 0, or constant (default: {c.lr_schedule})")
    t.add_argument("--warmup-steps", type=nonnegative_int, help=f"(default: {c.warmup_steps})")
    t.add_argument("--ema-decay", type=finite_float, help=f"in [0, 1) (default: {c.ema_decay})")
    t.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, help=f"min_snr (Hang et al.) or uniform (default: {c.loss_weighting})")
    t.add_argument("--precision", choices=PRECISIONS, help="auto (the default): bf16 where the hardware runs it fast, else fp32")
    t.add_argument("--seed", type=seed, help=f"0 ... 2^32 - 1 (default: {c.seed})")
    t.add_argument("--patch-size", type=positive_int, help=f"fold p x p pixel patches into channels first (default: {m.patch_size})")
    t.add_argument("--base-channels", type=positive_int, help=f"(default: {m.base_channels})")
    t.add_argument("--channel-mults", type=int_tuple, help="e.g. 1,2,2 (default: 1,2,4)")
    t.add_argument("--num-res-blocks", type=positive_int, help=f"(default: {m.num_res_blocks})")
    t.add_argument("--attention-resolutions", type=int_tuple, help="e.g. 16,8; '' for none (default: the lowest resolution, 7 for MNIST)")
    t.add_argument("--dropout", type=finite_float, help=f"in [0, 1) (default: {m.dropout})")
    t.add_argument("--conditional", action="store_true", help="condition the U-Net on the dataset's class labels (for guidance)")
    t.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from this trained model's EMA weights (its U-Net shape and diffusion settings too), e.g. an unconditional "
        "model before --conditional training; a new class embedding starts at zero",
    )
    t.add_argument(
        "--label-dropout",
        type=finite_float,
        help=f"with --conditional: share of labels dropped to 'no label', in [0, 1] (default: {c.label_dropout})",
    )
    t.add_argument(
        "--sample-every", type=nonnegative_int, help=f"steps between sample grids beside --out, 0: never (default: {c.sample_every})"
    )
    t.add_argument(
        "--checkpoint-every", type=nonnegative_int, help=f"steps between checkpoints, 0: at the end (default: {c.checkpoint_every})"
    )
    t.add_argument("--snapshot-every", type=nonnegative_int, help="steps between EMA-only snapshots beside --out, 0: never (the default)")
    t.add_argument("--num-workers", type=nonnegative_int, help=f"data-loading processes (default: {c.num_workers})")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--resume", action="store_true", help=f"continue the run saved in --out; only {resumable} may change")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")

    e = sub.add_parser("export", help="write only the configs and EMA weights of a training checkpoint, for sharing")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    e.add_argument("--out", required=True, help="the small checkpoint to write (.pt)")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")

    for name, helptext in (
        ("sample", "draw samples from a checkpoint into a PNG grid or a .npy array"),
        ("gif", "write the reverse diffusion of a few samples as a GIF"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
        s.add_argument("--num", type=image_count, default=64 if name == "sample" else 16, help="number of images")
        s.add_argument(
            "--sampler",
            choices=list(SOLVERS),
            default="ddpm",
            help="ddpm (all T steps), ddim, heun (2 network evaluations a step) or dpmpp2m (DPM-Solver++(2M)) (default: ddpm)",
        )
        s.add_argument("--steps", type=positive_int, help="steps of ddim, heun or dpmpp2m (default: T)")
        s.add_argument("--eta", type=finite_float, help="ddim's noise: 0 deterministic (the default), 1 DDPM-like")
        s.add_argument("--variance", choices=VARIANCES, help="ddpm's step variance (default: beta_tilde)")
        s.add_argument("--seed", type=seed, default=0, help="0 ... 2^32 - 1 (default: 0)")
        s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
        s.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the hardware runs it fast, else fp32")
        s.add_argument(
            "--label",
            type=label_list,
            help="the class to draw (a conditional model, or with --classifier): one, a comma-separated list (equal shares in "
            "that order) or 'all' (an equal share of each class, in class order)",
        )
        s.add_argument(
            "--guidance",
            type=finite_float,
            help=f"classifier-free guidance weight w, with --label on a class-conditional model: eps = (1 + w) eps(x_t, y) - w eps(x_t); "
            f"0: the plain conditional model (default: {DEFAULT_GUIDANCE:g}, the shipped model's best)",
        )
        s.add_argument("--classifier", help="a noisy classifier (scripts/train_noisy_classifier.py) to guide toward --label")
        s.add_argument(
            "--classifier-scale",
            type=finite_float,
            help=f"classifier guidance scale s (default: {DEFAULT_CLASSIFIER_SCALE:g}, the best found for the shipped models)",
        )
        s.add_argument("--out", required=True, help=".png or .npy" if name == "sample" else ".gif")
    s.add_argument("--frames", type=positive_int, default=60, help="frames in the GIF")
    s.add_argument("--duration-ms", type=gif_duration, default=80, help=f"milliseconds per frame, at most {GIF_MAX_MS:,} (GIF's limit)")
    s.add_argument("--no-x0", action="store_true", help="show x_t only, not the predicted x0 beside it")
    s.add_argument("--levels", type=grey_levels, default=32, help="grey levels per pixel (256: all; fewer: smaller file)")

    n = sub.add_parser("nll", help="the variational bound (Ho et al. Eq. 5) in bits/dim on the first N test images")
    n.add_argument("--checkpoint", required=True, help="a checkpoint written by train or export")
    n.add_argument("--num", type=positive_int, default=100, help="the first N images of the test set")
    n.add_argument("--seed", type=seed, default=0, help="seeds the noise of every x_t, 0 ... 2^32 - 1 (default: 0)")
    n.add_argument("--dataset", choices=[d for d in DATASETS if d != "folder"], help="(default: the checkpoint's own, else mnist)")
    n.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    n.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    return parser


def given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of config class ``cls`` that were set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def new_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    """A fresh run from the command line; every config is validated before the data is loaded."""
    dataset_name = args.dataset or TrainConfig.dataset
    channels, native = dataset_info(dataset_name)
    size = args.image_size or native
    if size is None:
        raise UsageError("--dataset folder needs --image-size")
    if args.label_dropout is not None and not args.conditional:
        raise UsageError("--label-dropout needs --conditional")
    labels = {"num_classes": num_classes(dataset_name) if args.conditional else 0}
    if args.init:
        init = load_checkpoint(args.init)
        source, diffusion_config = model_from_state(init, args.init)
        model_config = source.config
        taken = [flag(name) for name in {**given(args, UNetConfig), **given(args, DiffusionConfig)} if name != "image_size"]
        if taken:
            raise UsageError(f"--init takes the U-Net and diffusion settings from {args.init}; drop {', '.join(taken)}")
        if (model_config.in_channels, model_config.image_size) != (channels, size):
            got = f"{model_config.in_channels} x {model_config.image_size} x {model_config.image_size}"
            raise UsageError(f"--init {args.init} is a model of {got} images, not {channels} x {size} x {size} ({dataset_name})")
        model_config = dataclasses.replace(model_config, **labels)
    else:
        shape = {"attention_resolutions": (), **given(args, UNetConfig), "image_size": size, **labels}
        model_config = UNetConfig(in_channels=channels, **shape)
        if args.attention_resolutions is None:  # default: attention at the lowest resolution
            model_config = dataclasses.replace(model_config, attention_resolutions=tuple(model_config.resolutions[-1:]))
        diffusion_config = DiffusionConfig(**given(args, DiffusionConfig))
    hflip = dataset_name in ("cifar10", "folder")  # photos may be mirrored, digits may not
    train_config = TrainConfig(**{**given(args, TrainConfig), "dataset": dataset_name, "hflip": hflip})
    dataset = get_dataset(dataset_name, args.data_root, True, args.image_size, hflip, in_memory=not hflip)
    if args.epochs:
        train_config = dataclasses.replace(train_config, steps=epochs_to_steps(args.epochs, len(dataset), train_config.batch_size))
    trainer = Trainer(model_config, diffusion_config, train_config, dataset, device)
    if args.init:
        try:
            trainer.init_weights(init["ema"])
        except (RuntimeError, ValueError) as e:
            raise UsageError(f"--init {args.init} does not fit this run: {' '.join(str(e).split())}") from None
    return trainer


def resumed_trainer(args: argparse.Namespace, out: Path, device: torch.device) -> Trainer:
    """The run saved in ``out``, with the flags --resume may change applied and any other that differs refused."""
    if not out.exists():
        raise UsageError(f"--resume: {out} does not exist")
    if args.init:
        raise UsageError("--init starts a new run; --resume continues the one in --out (drop --init)")
    state = load_checkpoint(out)
    saved = saved_configs(state, out)
    fixed = {**given(args, TrainConfig), **given(args, DiffusionConfig), **given(args, UNetConfig)}
    differ = []
    for name, value in fixed.items():
        if name in RESUMABLE or name == "steps":
            continue
        was = next(getattr(config, name) for config in saved if hasattr(config, name))  # image_size: the model's
        if value != was:
            differ.append(f"{flag(name)} (saved: {','.join(map(str, was)) if isinstance(was, tuple) else was})")
    if args.conditional and not saved[0].num_classes:
        differ.append("--conditional (saved: an unconditional model)")
    if differ:
        raise UsageError(f"--resume cannot change {', '.join(differ)}; drop these flags, or start a new run with another --out")
    step = state.get("step")  # from_state checks it; refuse too few steps before the data is loaded
    if isinstance(step, int) and args.steps is not None and args.steps <= step:
        raise UsageError(f"--steps {args.steps} is not above the step {out} has reached ({step}); pass more steps to train on")
    changes = {name: getattr(args, name) for name in (*RESUMABLE, "steps") if getattr(args, name) is not None}
    trainer = Trainer.from_state(state, out, device=device, data_root=args.data_root, **changes)
    step = trainer.step
    if args.epochs:
        steps = epochs_to_steps(args.epochs, len(trainer.dataset), trainer.config.batch_size)
        if steps <= step:
            raise UsageError(f"--epochs {args.epochs} is {steps} steps, not above the step {out} has reached ({step})")
        trainer.config = dataclasses.replace(trainer.config, steps=steps)
    if trainer.config.steps <= step:
        raise UsageError(f"the run in {out} is complete ({step} of {trainer.config.steps} steps); pass --steps above {step} to train on")
    return trainer


def cmd_train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rank, device = distributed.start(resolve_device(args.device))  # under torchrun: this rank's device and process group
    try:
        with contextlib.ExitStack() as held:
            train(args, out, rank, device, held)
        distributed.barrier(rank)  # no rank leaves while another still talks to it
    finally:
        distributed.stop()


def train(args: argparse.Namespace, out: Path, rank: distributed.Rank, device: torch.device, held: contextlib.ExitStack) -> None:
    """cmd_train on one rank: every rank sets up (rank 0 alone checks --out and locks it), agrees that all
    did, then trains; every rank ends with the same error or exit status."""
    with distributed.together(rank):  # one rank's failure becomes every rank's, with its message
        if rank.is_main:
            check_writable(out)
            held.enter_context(exclusive_lock(out))  # held for the whole run: a second run on this --out refuses at once
            if out.exists() and not args.resume:
                raise UsageError(f"{out} exists; pass --resume to continue that run, or choose another --out")
        trainer = resumed_trainer(args, out, device) if args.resume else new_trainer(args, device)
    start, steps = trainer.step, trainer.config.steps
    where = f"{trainer.device} ({device_name(trainer.device)})"
    if rank.distributed:
        per_rank = trainer.config.batch_size // rank.world_size
        where = f"{rank.world_size} ranks of {trainer.device.type} (rank 0: {where}), {per_rank} images per rank and step"
    if rank.is_main:
        print(f"training on {where}, {len(trainer.dataset)} images, steps {trainer.step} -> {steps}", file=sys.stderr)
        if isinstance(trainer.dataset, ImageFiles) and trainer.dataset.skipped:
            print(f"skipped {skipped_summary(trainer.dataset.skipped)} (they do not decode as images)", file=sys.stderr)

    def save_samples(step: int, grid: torch.Tensor) -> None:
        save_grid(grid, out.with_name(f"{out.stem}_samples_{step:07d}.png"))

    try:
        trainer.fit(steps, checkpoint_path=out, on_sample=save_samples)
    except DivergenceError as e:
        if trainer.saved_step is None:
            kept = f"{out} was not written"
        elif trainer.saved_step == start:
            kept = f"{out} is unchanged (step {start})"
        else:
            kept = f"{out} holds step {trainer.saved_step}, its last checkpoint before that"
        fp32 = " or --precision fp32" if trainer.bf16 else ""
        raise Diverged(f"{e}; {kept}; try a lower --lr (this run: {trainer.config.lr:g}){fp32}, then --resume") from None
    except KeyboardInterrupt:
        if trainer.saved_step == trainer.step:
            raise Interrupted(f"interrupted at step {trainer.step}: saved {out}; continue with --resume") from None
        kept = f"{out} holds step {trainer.saved_step}" if trainer.saved_step is not None else f"{out} was not written"
        raise Interrupted(f"interrupted again while saving, at step {trainer.step}: {kept}") from None
    if rank.is_main:
        print(f"wrote {out} (step {trainer.step}, last loss {trainer.losses[-1]:.4f})", file=sys.stderr)


def load_for_sampling(args: argparse.Namespace, suffixes: tuple[str, ...]):
    """Validate the sampling arguments before any work, then load the model: (denoiser, solver, chw, labels, guide)."""
    if Path(args.out).suffix.lower() not in suffixes:
        raise UsageError(f"--out must end in {' or '.join(suffixes)}, got {args.out}")
    solver = make_solver(args.sampler, steps=args.steps, eta=args.eta, variance=args.variance)  # checks its own options
    check_writable(args.out)
    device = resolve_device(args.device)
    model, diffusion = load_model(args.checkpoint, device)
    timesteps = solver.timesteps(diffusion.T)  # raises for steps outside 1 ... T, and DDPM with fewer than T
    c = model.config
    chw = (c.in_channels, c.image_size, c.image_size)
    require_output(args, chw, len(timesteps) + 1)
    denoiser = Denoiser(model, diffusion, bf16=use_bf16(args.precision, device), batch_size=BATCH)
    labels, guide = guidance_args(args, model, diffusion, chw, device)
    check_network(denoiser, chw)  # a blown-up or untrained model is refused before the long run
    return denoiser, solver, chw, labels, guide


def guidance_args(args: argparse.Namespace, model, diffusion: DiffusionConfig, chw: tuple, device: torch.device):
    """The (num,) labels (or None) and sample_loop's guidance arguments of --label, --guidance, --classifier and --classifier-scale."""
    if args.classifier_scale is not None and args.classifier is None:
        raise UsageError("--classifier-scale needs --classifier")
    if args.guidance is not None and not model.config.num_classes:
        raise UsageError(f"--guidance: {args.checkpoint} is an unconditional model; guide it with --classifier and --label instead")
    if args.label is None:
        if args.guidance is not None or args.classifier is not None:
            raise UsageError(f"--{'guidance' if args.guidance is not None else 'classifier'} needs --label, the class to guide toward")
        return None, {}
    classifier = None
    if args.classifier is not None:
        classifier, trained_for = load_noisy_classifier(args.classifier)
        try:
            check_matches(classifier, trained_for, diffusion, chw)
        except ValueError as e:
            raise UsageError(f"--classifier {args.classifier} does not fit {args.checkpoint}: {e}") from None
        classifier = classifier.to(device)
        classes = classifier.config.num_classes
    elif model.config.num_classes:
        classes = model.config.num_classes
    else:
        raise UsageError(f"--label: {args.checkpoint} is an unconditional model; add --classifier to guide it toward a class")
    wanted = list(range(classes)) if args.label == "all" else args.label
    if max(wanted) >= classes:
        raise UsageError(f"--label {max(wanted)} is out of range: this model knows classes 0 ... {classes - 1}")
    if args.num < len(wanted):
        raise UsageError(f"--num {args.num} is fewer images than the {len(wanted)} classes asked for; pass --num {len(wanted)} or more")
    labels = class_blocks(wanted, args.num)
    guide = {"guidance": DEFAULT_GUIDANCE if args.guidance is None else args.guidance} if model.config.num_classes else {}
    if classifier is not None:
        scale = DEFAULT_CLASSIFIER_SCALE if args.classifier_scale is None else args.classifier_scale
        guide.update(classifier=classifier, classifier_scale=scale)
    return labels, guide


BATCH = 256  # images the network sees at once when sampling: memory stays flat however large --num is


def require_output(args: argparse.Namespace, chw: tuple[int, int, int], num_steps: int) -> None:
    """Refuse a --num whose samples or output file cannot fit in this machine's memory or disk, before sampling.

    Estimates, generous on purpose: sample keeps every image as float32 and tiles a float grid for a
    PNG; gif keeps every frame, each a grid of --num images upscaled (x_t beside the predicted x0).
    """
    c, h, w = chw
    n = args.num
    if args.command == "sample":
        grid = n * (h + 2) * (w + 2) * 3  # make_grid's padded RGB tiling
        memory = 4 * n * c * h * w + (8 * grid if args.out.lower().endswith(".png") else 0)
        disk = n * c * h * w if args.out.lower().endswith(".npy") else grid
    else:
        rows = math.ceil(math.sqrt(n))
        scale = auto_scale(w, rows)
        frame = n * (h * scale + 2) * (w * scale + 2) * c * (1 if args.no_x0 else 2)
        frames = min(args.frames, num_steps)
        memory = 16 * n * c * h * w + 3 * frames * frame  # x_t, x0 and eps of every image; every frame, stacked, and encoded
        disk = frames * frame
    require(f"--num {n:,} ({format_bytes(4 * n * c * h * w)} of samples)", memory=memory, disk=disk, out=args.out)


def cmd_sample(args: argparse.Namespace) -> None:
    denoiser, solver, chw, labels, guide = load_for_sampling(args, (".png", ".npy"))
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for start in range(0, args.num, BATCH):  # each batch its own x_T: memory stays flat however large --num is
        n = min(BATCH, args.num - start)
        y = labels[start : start + n] if labels is not None else None
        batches.append(sample(guided(denoiser, y, **guide), (n, *chw), solver, generator=generator).cpu())
    x = check_samples(torch.cat(batches))  # (N, C, H, W); blank or broken samples are an error, not a black picture
    if args.out.lower().endswith(".npy"):
        buffer = io.BytesIO()
        np.save(buffer, to_uint8(x).numpy())
        write_atomic(args.out, buffer.getbuffer())
    else:
        save_grid(x, args.out)
    print(f"wrote {args.out} ({args.num} samples)", file=sys.stderr)


def cmd_gif(args: argparse.Namespace) -> None:
    denoiser, solver, chw, labels, guide = load_for_sampling(args, (".gif",))
    generator = torch.Generator().manual_seed(args.seed)
    steps = sample_loop(guided(denoiser, labels, **guide), (args.num, *chw), solver, generator=generator)
    steps = check_trajectory(steps)  # raises at the finished samples if they are blank or broken: no GIF is written
    num_steps = len(solver.timesteps(denoiser.schedule.T)) + 1
    show_x0 = not args.no_x0
    save_trajectory_gif(steps, args.out, num_steps, frames=args.frames, duration_ms=args.duration_ms, show_x0=show_x0, levels=args.levels)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise UsageError("--out must differ from --checkpoint: export never replaces the training state")
    with exclusive_lock(args.out):  # not while a training run writes there
        if Path(args.out).exists() and not args.force:
            raise UsageError(f"{args.out} exists (it may be another run's checkpoint); pass --force to replace it")
        state = export_ema(args.checkpoint, args.out, overwrite=args.force)
    print(f"wrote {args.out} (EMA weights at step {state['step']}, {Path(args.out).stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


def cmd_nll(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    model, diffusion = model_from_state(state, args.checkpoint)
    saved = state.get("train_config")
    name = args.dataset or (saved.get("dataset") if isinstance(saved, dict) else None) or "mnist"
    if name == "folder":
        raise UsageError(f"{args.checkpoint} was trained on a folder of images, which has no test split; pass --dataset")
    test = get_dataset(name, args.data_root, train=False)
    if args.num > len(test):
        raise UsageError(f"--num {args.num}: the {name} test set has {len(test)} images")
    x0 = torch.stack([test[i][0] for i in range(args.num)])  # (N, C, H, W)
    c = model.config
    if tuple(x0.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
        raise UsageError(f"{name} images are {tuple(x0.shape[1:])}, but the model takes {(c.in_channels, c.image_size, c.image_size)}")
    model, schedule = model.to(device), diffusion.make_schedule()
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    bounds = [variational_bound(model, batch, schedule, diffusion.prediction, generator) for batch in x0.split(BATCH)]
    bound = Bound(*(torch.cat(parts) for parts in zip(*bounds, strict=True)))
    seconds = time.perf_counter() - started
    print(f"{args.num} images in {seconds:.0f} s ({seconds / args.num:.2f} s each) on {device} ({device_name(device)})", file=sys.stderr)
    print(f"variational bound on the first {args.num} {name} test images (seed {args.seed}), bits/dim, 0-based t:")
    for label, bits in bound_table(bound):
        print(f"  {label:<30} {bits:8.4f}")
    print(f"bits/dim: {bound.total.mean().item():.4f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "export": cmd_export, "sample": cmd_sample, "gif": cmd_gif, "nll": cmd_nll}[args.command]
    prefix = f"python -m ddpm_lib {args.command}"
    try:
        command(args)
    except (UsageError, CheckpointError, DatasetNotFoundError, OutputPathError, ValueError) as e:
        return fail(f"{prefix}: error: {e}", 2)
    except Diverged as e:
        return fail(f"{prefix}: error: {e}", 3)
    except Interrupted as e:
        return fail(f"{prefix}: {e}", 130)
    except KeyboardInterrupt:
        return fail(f"{prefix}: interrupted", 130)
    return 0


def fail(message: str, status: int) -> int:
    """Print the one-line ``message`` (and, under torchrun, leave it for torchrun's report); return ``status``."""
    print(message, file=sys.stderr)
    distributed.record_error(f"{message} (exit status {status})")
    return status
