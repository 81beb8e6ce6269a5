"""python -m ddpm_lib train | export | sample | gif: the course's library from the shell.

Every failure a user can cause (a bad argument, a missing or corrupt checkpoint, an
unwritable output) ends with a one-line message on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, export_ema, load_model
from .data import DATASETS, DatasetNotFoundError, dataset_info, get_dataset
from .diffusion import PREDICTIONS, DiffusionConfig
from .files import OutputPathError, atomic_write, check_writable
from .sampling import SAMPLERS, VARIANCES, ddim_timesteps, sample, sample_loop
from .schedules import SCHEDULES
from .training import (
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    PRECISIONS,
    TrainConfig,
    Trainer,
    default_device,
    device_name,
    epochs_to_steps,
    use_bf16,
)
from .unet import UNetConfig
from .viz import check_levels, save_grid, save_trajectory_gif, to_uint8


class UsageError(Exception):
    """A bad command line; the message is shown as is."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def grey_levels(text: str) -> int:
    value = int(text)
    try:
        check_levels(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> Parser:
    parser = Parser(prog="python -m ddpm_lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a U-Net on a dataset and write a checkpoint")
    d, m, c = DiffusionConfig, UNetConfig, TrainConfig
    t.add_argument("--dataset", choices=list(DATASETS), default=c.dataset)
    t.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data); for --dataset folder, the image folder")
    t.add_argument("--image-size", type=positive_int, help="resize and crop images to this size (default: the dataset's own)")
    t.add_argument("--schedule", choices=list(SCHEDULES), default=d.schedule)
    t.add_argument("--T", type=positive_int, default=d.T, help=f"diffusion steps (default: {d.T})")
    t.add_argument("--prediction", choices=PREDICTIONS, default=d.prediction)
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help=f"optimizer steps in total (default: {c.steps})")
    length.add_argument("--epochs", type=float, help="passes over the training set, instead of --steps")
    t.add_argument("--batch-size", type=positive_int, default=c.batch_size)
    t.add_argument("--lr", type=float, default=c.lr)
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=c.lr_schedule, help="after warm-up: cosine decay to 0, or constant")
    t.add_argument("--warmup-steps", type=int, default=c.warmup_steps)
    t.add_argument("--ema-decay", type=float, default=c.ema_decay)
    t.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default=c.loss_weighting, help="min_snr (Hang et al.) or uniform")
    t.add_argument("--precision", choices=PRECISIONS, default=c.precision, help="auto: bf16 where the hardware runs it fast, else fp32")
    t.add_argument("--seed", type=int, default=c.seed)
    t.add_argument("--patch-size", type=positive_int, default=m.patch_size, help="fold p x p pixel patches into channels first")
    t.add_argument("--base-channels", type=positive_int, default=m.base_channels)
    t.add_argument("--channel-mults", type=int_tuple, default=m.channel_mults, help="e.g. 1,2,2")
    t.add_argument("--num-res-blocks", type=positive_int, default=m.num_res_blocks)
    t.add_argument("--attention-resolutions", type=int_tuple, help="e.g. 16,8; '' for none (default: the lowest resolution, 7 for MNIST)")
    t.add_argument("--dropout", type=float, default=m.dropout)
    t.add_argument("--sample-every", type=int, default=c.sample_every, help="steps between sample grids saved beside --out (0: never)")
    t.add_argument("--checkpoint-every", type=int, default=c.checkpoint_every)
    t.add_argument("--snapshot-every", type=int, default=c.snapshot_every, help="steps between EMA-only snapshots beside --out (0: never)")
    t.add_argument("--num-workers", type=int, default=c.num_workers)
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out up to --steps/--epochs")
    t.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    e = sub.add_parser("export", help="write only the configs and EMA weights of a training checkpoint, for sharing")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    e.add_argument("--out", required=True, help="the small checkpoint to write (.pt)")

    for name, helptext in (
        ("sample", "draw samples from a checkpoint into a PNG grid or a .npy array"),
        ("gif", "write the reverse diffusion of a few samples as a GIF"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
        s.add_argument("--num", type=int, default=64 if name == "sample" else 16, help="number of images")
        s.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
        s.add_argument("--steps", type=int, help="DDIM steps (default: T)")
        s.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
        s.add_argument("--variance", choices=VARIANCES, default="beta_tilde", help="DDPM step variance")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--device", help="cuda or cpu (default: cuda when available)")
        s.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the hardware runs it fast, else fp32")
        s.add_argument("--out", required=True, help=".png or .npy" if name == "sample" else ".gif")
    s.add_argument("--frames", type=positive_int, default=60, help="frames in the GIF")
    s.add_argument("--duration-ms", type=positive_int, default=80, help="milliseconds per frame")
    s.add_argument("--no-x0", action="store_true", help="show x_t only, not the predicted x0 beside it")
    s.add_argument("--levels", type=grey_levels, default=32, help="grey levels per pixel (256: all; fewer: smaller file)")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_writable(out)
    if out.exists() and not args.resume:
        raise UsageError(f"{out} exists; pass --resume to continue that run, or choose another --out")
    if args.resume and not out.exists():
        raise UsageError(f"--resume: {out} does not exist")
    if args.resume:
        trainer = Trainer.from_checkpoint(out, device=args.device, data_root=args.data_root)
        steps = args.steps or (
            epochs_to_steps(args.epochs, len(trainer.dataset), trainer.config.batch_size) if args.epochs else trainer.config.steps
        )
    else:
        channels, native = dataset_info(args.dataset)
        size = args.image_size or native
        if size is None:
            raise UsageError("--dataset folder needs --image-size")
        model_config = UNetConfig(
            in_channels=channels,
            image_size=size,
            patch_size=args.patch_size,
            base_channels=args.base_channels,
            channel_mults=args.channel_mults,
            num_res_blocks=args.num_res_blocks,
            attention_resolutions=args.attention_resolutions or (),
            dropout=args.dropout,
        )
        if args.attention_resolutions is None:  # default: attention at the lowest resolution
            model_config = dataclasses.replace(model_config, attention_resolutions=tuple(model_config.resolutions[-1:]))
        diffusion_config = DiffusionConfig(args.schedule, args.T, args.prediction)
        hflip = args.dataset in ("cifar10", "folder")  # photos may be mirrored, digits may not
        dataset = get_dataset(args.dataset, args.data_root, True, args.image_size, hflip, in_memory=not hflip)
        steps = args.steps or (epochs_to_steps(args.epochs, len(dataset), args.batch_size) if args.epochs else TrainConfig.steps)
        train_config = TrainConfig(
            dataset=args.dataset,
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=steps,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            ema_decay=args.ema_decay,
            loss_weighting=args.loss_weighting,
            precision=args.precision,
            seed=args.seed,
            hflip=hflip,
            sample_every=args.sample_every,
            checkpoint_every=args.checkpoint_every,
            snapshot_every=args.snapshot_every,
            num_workers=args.num_workers,
        )
        trainer = Trainer(model_config, diffusion_config, train_config, dataset, args.device)
    trainer.config = dataclasses.replace(trainer.config, steps=steps)
    where = f"{trainer.device} ({device_name(trainer.device)})"
    print(f"training on {where}, {len(trainer.dataset)} images, steps {trainer.step} -> {steps}", file=sys.stderr)
    trainer.fit(
        steps, checkpoint_path=out, on_sample=lambda step, grid: save_grid(grid, out.with_name(f"{out.stem}_samples_{step:07d}.png"))
    )
    print(f"wrote {out} (step {trainer.step}, last loss {trainer.losses[-1]:.4f})", file=sys.stderr)


def load_for_sampling(args: argparse.Namespace, suffixes: tuple[str, ...]):
    """Validate the sampling arguments before any work, then load the model."""
    if args.num < 1:
        raise UsageError(f"--num must be at least 1, got {args.num}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    if Path(args.out).suffix.lower() not in suffixes:
        raise UsageError(f"--out must end in {' or '.join(suffixes)}, got {args.out}")
    check_writable(args.out)
    device = torch.device(args.device) if args.device else default_device()
    model, diffusion = load_model(args.checkpoint, device)
    if args.sampler == "ddpm" and args.steps not in (None, diffusion.T):
        raise UsageError(f"--steps {args.steps}: DDPM always takes T={diffusion.T} steps; use --sampler ddim for fewer")
    if args.steps is not None:
        ddim_timesteps(diffusion.T, args.steps)  # raises for steps outside 1 ... T
    c = model.config
    bf16 = use_bf16(args.precision, device)
    loop_args = dict(
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        variance=args.variance,
        prediction=diffusion.prediction,
        device=device,
        bf16=bf16,
    )
    return model, diffusion, (c.in_channels, c.image_size, c.image_size), loop_args


def cmd_sample(args: argparse.Namespace) -> None:
    model, diffusion, chw, loop_args = load_for_sampling(args, (".png", ".npy"))
    generator = torch.Generator().manual_seed(args.seed)
    schedule = diffusion.make_schedule()
    batches = []
    for start in range(0, args.num, 256):
        n = min(256, args.num - start)
        batches.append(sample(model, schedule, (n, *chw), generator=generator, **loop_args).cpu())
    x = torch.cat(batches)  # (N, C, H, W)
    if args.out.lower().endswith(".npy"):
        with atomic_write(args.out) as tmp, open(tmp, "wb") as f:
            np.save(f, to_uint8(x).numpy())
    else:
        save_grid(x, args.out)
    print(f"wrote {args.out} ({args.num} samples)", file=sys.stderr)


def cmd_gif(args: argparse.Namespace) -> None:
    model, diffusion, chw, loop_args = load_for_sampling(args, (".gif",))
    generator = torch.Generator().manual_seed(args.seed)
    steps = sample_loop(model, diffusion.make_schedule(), (args.num, *chw), generator=generator, **loop_args)
    num_steps = (args.steps or diffusion.T) + 1
    show_x0 = not args.no_x0
    save_trajectory_gif(steps, args.out, num_steps, frames=args.frames, duration_ms=args.duration_ms, show_x0=show_x0, levels=args.levels)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise UsageError("--out must differ from --checkpoint: export never replaces the training state")
    state = export_ema(args.checkpoint, args.out)
    print(f"wrote {args.out} (EMA weights at step {state['step']}, {Path(args.out).stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "export": cmd_export, "sample": cmd_sample, "gif": cmd_gif}[args.command]
    try:
        command(args)
    except (UsageError, CheckpointError, DatasetNotFoundError, OutputPathError, ValueError) as e:
        print(f"python -m ddpm_lib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"python -m ddpm_lib {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
