"""python -m ddpm_lib train | export | sample | gif | nll: the course's library from the shell.

Every failure a user can cause (a bad argument, a missing or corrupt checkpoint, an
unwritable output, a device this machine lacks) ends with a one-line message on stderr and exit
status 2, before any long work, and no traceback. A training run that diverges stops with exit
status 3, a torchrun run whose other rank died with 4, and Ctrl-C saves the checkpoint and exits with
130 (see docs/cli.md).
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
from .checkpoint import CheckpointError, check_output, export_ema
from .data import DATASETS, DatasetNotFoundError, ImageChanged, ImageFiles, skipped_summary
from .devices import device_name, resolve_device
from .diffusion import DiffusionConfig
from .divergence import DivergenceError
from .files import OutputPathError, check_writable, exclusive_lock, write_atomic
from .generate import BATCH, SampleRequest, default_sampler, prepare
from .guidance import DEFAULT_CLASSIFIER_SCALE, DEFAULT_GUIDANCE
from .likelihood import bound_of_test_images, bound_table
from .onnx_export import export_onnx
from .parametrizations import PREDICTIONS
from .paths import PATHS
from .runs import RESUMABLE, flag, new_run, resumed_run
from .sampling import VARIANCES
from .schedules import SCHEDULES
from .solvers import SOLVERS, make_solver
from .training import LR_SCHEDULES, PRECISIONS, TIME_SAMPLINGS, TrainConfig, max_workers, snapshot_path
from .unet import UNetConfig
from .viz import GIF_MAX_MS, check_levels, save_grid, save_trajectory_gif, to_uint8
from .weightings import LOSS_WEIGHTINGS


class UsageError(Exception):
    """A bad command line; the message is shown as is (exit status 2)."""


class Diverged(Exception):
    """Training diverged; the message says what was kept and what to try (exit status 3)."""


class Interrupted(Exception):
    """Ctrl-C, or under torchrun its SIGTERM or its death; the message says what was saved (exit status 130)."""


class RankLost(Exception):
    """Under torchrun, another rank died (killed, or a crash) mid-run; the message says what was kept (exit status 4)."""


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


def worker_count(text: str) -> int:
    return whole_number(text, 0, max_workers())


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


TRAIN_EPILOG = (
    "Exit status: 0 done; 2 a bad input, with a one-line message before any work; 3 training blew up (the last "
    "checkpoint, written before it, is kept); 4 under torchrun, another rank died; 130 Ctrl-C, or torchrun killed (saved). "
    "Under torchrun every rank ends so, but torchrun itself exits 1 and prints its own report, whose 'exitcode' and "
    "'traceback' lines give each rank's status and message (docs/cli.md, 'Under torchrun')."
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
    t.add_argument("--prediction", choices=PREDICTIONS, help=f"what the network predicts (default: {d.prediction})")
    t.add_argument(
        "--path",
        choices=list(PATHS),
        help="the noise levels: vp, Ho et al.'s variance-preserving path over --schedule and --T (the default); linear_flow, "
        "flow matching's straight line in continuous time (with --prediction velocity, v or x0, and --loss-weighting uniform)",
    )
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
    t.add_argument(
        "--time-sampling",
        choices=TIME_SAMPLINGS,
        help=f"training times: uniform, or logit_normal on the linear_flow path (Esser et al. 2024) (default: {c.time_sampling})",
    )
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
    t.add_argument(
        "--num-workers",
        type=worker_count,
        help=f"data-loading processes, at most this machine's {max_workers()} cores (default: {c.num_workers})",
    )
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--resume", action="store_true", help=f"continue the run saved in --out; only {resumable} may change")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")

    e = sub.add_parser("export", help="write only the configs and EMA weights of a training checkpoint, for sharing")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    e.add_argument("--out", required=True, help="the small checkpoint to write (.pt), or model.onnx with --format onnx")
    e.add_argument(
        "--format",
        choices=("pt", "onnx"),
        default="pt",
        help="pt: configs and EMA weights for PyTorch (the default); onnx: the EMA network as ONNX, the path's grid inside the file",
    )
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
            help="; ".join(f"{name}: {cls.summary}" for name, cls in SOLVERS.items())
            + " (default: the checkpoint's path's, "
            + ", ".join(f"{path.default_solver} on {name}" for name, path in PATHS.items())
            + ")",
        )
        s.add_argument("--steps", type=positive_int, help="steps of every sampler but ddpm (default: T on the vp path, 100 on linear_flow)")
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
        trainer = resumed_run(out, vars(args), device) if args.resume else new_run(vars(args), device)
        if rank.is_main:  # the files written beside --out, whose names are longer than its own
            cfg = trainer.config
            for every, name, path in (
                (cfg.sample_every, "--sample-every", grid_path(out, 0)),
                (cfg.snapshot_every, "--snapshot-every", snapshot_path(out, 0)),
            ):
                if every:
                    try:
                        check_writable(path)
                    except OutputPathError as e:
                        raise UsageError(f"{e}: choose a shorter --out, or pass {name} 0") from None
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
        save_grid(grid, grid_path(out, step))

    try:
        trainer.fit(steps, checkpoint_path=out, on_sample=save_samples)
    except DivergenceError as e:
        fp32 = " or --precision fp32" if trainer.bf16 else ""
        what = f"try a lower --lr (this run: {trainer.config.lr:g}){fp32}, then --resume"
        raise Diverged(f"{e}; {kept(trainer, out, start)}; {what}") from None
    except KeyboardInterrupt as e:
        if trainer.saved_step != trainer.step:
            raise Interrupted(f"interrupted again while saving, at step {trainer.step}: {kept(trainer, out, start)}") from None
        why = "torchrun, which started this rank, is gone; stopped" if isinstance(e, distributed.LauncherGone) else "interrupted"
        raise Interrupted(f"{why} at step {trainer.step}: saved {out}; continue with --resume") from None
    except ImageChanged as e:
        saved = f"saved {out}" if trainer.saved_step == trainer.step else kept(trainer, out, start)
        raise UsageError(f"{e}; stopped at step {trainer.step}: {saved}; repair or remove the file, then --resume") from None
    except RuntimeError as e:
        what = distributed.lost_rank(e) if rank.distributed else None
        if what is None:
            raise
        where = f"lost contact with another rank at step {trainer.step + 1} ({what})"
        raise RankLost(f"{where}; {kept(trainer, out, start)}; continue with --resume") from None
    if rank.is_main:
        print(f"wrote {out} (step {trainer.step}, last loss {trainer.losses[-1]:.4f})", file=sys.stderr)


def grid_path(out: Path, step: int) -> Path:
    """Where train writes the sample grid of ``step``: runs/mnist.pt -> runs/mnist_samples_0001000.png."""
    return out.with_name(f"{out.stem}_samples_{step:07d}.png")


def kept(trainer, out: Path, start: int) -> str:
    """What --out holds after a run stopped early: "run.pt holds step 400, its last checkpoint", ..."""
    if trainer.saved_step is None:
        return f"{out} was not written"
    if trainer.saved_step == start:
        return f"{out} is unchanged (step {start})"
    return f"{out} holds step {trainer.saved_step}, its last checkpoint"


def sample_request(args: argparse.Namespace, suffixes: tuple[str, ...]) -> SampleRequest:
    """The request of sample or gif, once --out's kind and folder are checked."""
    if Path(args.out).suffix.lower() not in suffixes:
        raise UsageError(f"--out must end in {' or '.join(suffixes)}, got {args.out}")
    check_writable(args.out)
    sampler = args.sampler or default_sampler(args.checkpoint)
    solver = make_solver(sampler, steps=args.steps, eta=args.eta, variance=args.variance)  # refuses an option it lacks
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SampleRequest) if f.name != "solver"}
    return SampleRequest(**options, solver=solver)


def cmd_sample(args: argparse.Namespace) -> None:
    plan = prepare(sample_request(args, (".png", ".npy")))
    plan.require_room(args.out)
    x = plan.images()  # (N, C, H, W); blank or broken samples are an error, not a black picture
    if args.out.lower().endswith(".npy"):
        buffer = io.BytesIO()
        np.save(buffer, to_uint8(x).numpy())
        write_atomic(args.out, buffer.getbuffer())
    else:
        save_grid(x, args.out)
    print(f"wrote {args.out} ({args.num} samples)", file=sys.stderr)


def cmd_gif(args: argparse.Namespace) -> None:
    plan = prepare(sample_request(args, (".gif",)))
    plan.require_room(args.out, frames=args.frames, show_x0=not args.no_x0)
    steps = plan.trajectory()  # raises at the finished samples if they are blank or broken: no GIF is written
    show_x0 = not args.no_x0
    save_trajectory_gif(steps, args.out, plan.num_steps, args.frames, duration_ms=args.duration_ms, show_x0=show_x0, levels=args.levels)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "onnx" and Path(args.out).suffix != ".onnx":
        raise UsageError(f"--out {args.out}: an ONNX export is named *.onnx")
    check_output(args.checkpoint, args.out, args.force)  # the path first: nothing is locked or made for an output that cannot be
    with exclusive_lock(args.out, tidy=True):  # not while a training run writes there
        if args.format == "onnx":
            try:
                meta = export_onnx(args.checkpoint, args.out, overwrite=args.force)
            except ImportError as e:
                raise UsageError(str(e)) from e
            size = Path(args.out).stat().st_size / 2**20
            print(f"wrote {args.out} ({size:.1f} MiB, EMA weights at step {meta['step']}, with its grid inside)", file=sys.stderr)
            return
        state = export_ema(args.checkpoint, args.out, overwrite=args.force)
    print(f"wrote {args.out} (EMA weights at step {state['step']}, {Path(args.out).stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


def cmd_nll(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    started = time.perf_counter()
    name, bound = bound_of_test_images(args.checkpoint, args.num, args.seed, args.dataset, args.data_root, device, BATCH)
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
    except RankLost as e:
        return fail(f"{prefix}: error: {e}", 4)
    except Interrupted as e:
        return fail(f"{prefix}: {e}", 130)
    except KeyboardInterrupt:
        return fail(f"{prefix}: interrupted", 130)
    return 0


def fail(message: str, status: int) -> int:
    """Print the one-line ``message`` (and, under torchrun, leave it for torchrun's report); return ``status``."""
    distributed.ending()
    print(message, file=sys.stderr)
    distributed.record_error(f"{message} (exit status {status})")
    return status
