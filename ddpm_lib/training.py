"""Training: AdamW on L_simple, an EMA of the weights, checkpoints that resume exactly (Ho et al. 2020, Alg. 1)."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import config_from_dict, load_checkpoint, save_checkpoint
from .data import dataset_info, get_dataset
from .diffusion import DiffusionConfig, loss_simple, min_snr_weight
from .sampling import eval_mode, sample
from .schedules import NoiseSchedule
from .unet import UNet, UNetConfig

PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
LOSS_WEIGHTINGS = ("min_snr", "uniform")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"  # one of data.DATASETS
    image_size: int | None = None  # None: the dataset's own size
    batch_size: int = 128  # images per optimizer step
    steps: int = 30_000  # optimizer steps in total (the shipped recipe: 194 minutes on a 2-core CPU with bf16)
    lr: float = 1e-3  # peak AdamW learning rate (Ho et al.: 2e-4 for a 35 M-parameter model; small models take more)
    warmup_steps: int = 200  # the learning rate rises linearly over these first steps
    lr_schedule: str = "cosine"  # after warm-up: "cosine" decays to 0 at the last step, "constant" stays (Ho et al.)
    weight_decay: float = 0.0  # AdamW weight decay
    loss_weighting: str = "min_snr"  # "uniform": L_simple as in Ho et al.; "min_snr": Min-SNR-gamma (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of Min-SNR weighting (the paper's default)
    ema_decay: float = 0.999  # EMA decay per step, warmed up as min(decay, (1 + n) / (10 + n)); Ho et al.: 0.9999 over 800k steps
    grad_clip: float = 1.0  # clip the global gradient norm to this (Ho et al.: 1.0)
    precision: str = "auto"  # "auto": bf16 autocast where the hardware runs it fast (fast_bf16), else fp32
    hflip: bool = False  # random horizontal flips (photos yes, digits no)
    seed: int = 0  # seeds the weights, the data order, t, the noise and dropout
    sample_every: int = 1000  # steps between sample grids of the EMA model (0: never)
    checkpoint_every: int = 1000  # steps between checkpoints when training to a file (0: only at the end)
    snapshot_every: int = 0  # steps between EMA-only snapshots saved beside that file, name_step0001000.pt (0: never)
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        dataset_info(self.dataset)  # validates the name
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {self.loss_weighting!r}; valid choices: {', '.join(LOSS_WEIGHTINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}")
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based optimizer step ``step``: linear warm-up to cfg.lr, then constant or a
    half cosine that reaches 0 after the last step (cfg.steps - 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EpochBatches(Sampler[list[int]]):
    """Batches of indices, reshuffled each epoch from (seed, epoch) alone, starting at any step.

    Step s reads batch s % batches_per_epoch of epoch s // batches_per_epoch, so a resumed
    run sees exactly the batches the uninterrupted run would have. Incomplete batches are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, i = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            yield perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            step += 1


class Trainer:
    """Owns the model, its EMA, the optimizer and every random stream of a training run.

    ``fit`` trains up to a step count and may be called again to continue; ``save`` and
    ``Trainer.from_checkpoint`` stop and resume a run exactly.
    """

    def __init__(
        self,
        model_config: UNetConfig,
        diffusion_config: DiffusionConfig,
        train_config: TrainConfig,
        dataset: Dataset | None = None,
        device: str | torch.device | None = None,
        data_root: str | os.PathLike | None = None,
    ):
        self.model_config, self.diffusion_config, self.config = model_config, diffusion_config, train_config
        self.device = torch.device(device) if device is not None else default_device()
        cfg = train_config
        if dataset is None:  # decoded once unless flips are random
            dataset = get_dataset(cfg.dataset, data_root, True, cfg.image_size, cfg.hflip, in_memory=not cfg.hflip)
        self.dataset = dataset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = UNet(model_config).to(self.device)
            self.rng_state = torch.get_rng_state()  # the global stream dropout draws from
        self.cuda_rng_state = None
        self.ema = AveragedModel(self.model, multi_avg_fn=self._ema_update, use_buffers=True)
        # fused: one kernel for all parameters (a 4 ms optimizer step takes 1 ms on 2 CPU cores)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.schedule = diffusion_config.make_schedule().to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)  # t and eps of every step
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in fit, over every resumed part of the run
        self.machine_seconds: dict[str, float] = {}  # that time split by device_name: resumes may run elsewhere
        self.losses: list[float] = []  # training loss of every step
        self.samples: list[tuple[int, torch.Tensor]] = []  # (step, (16, C, H, W) EMA samples in [-1, 1])

    def _ema_update(self, ema: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        decay = min(self.config.ema_decay, (1 + int(n)) / (10 + int(n)))
        torch._foreach_lerp_(ema, current, 1 - decay)

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with the global RNG (used by dropout) set to this run's own stream, then store it back."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.rng_state)
            if devices and self.cuda_rng_state is not None:
                torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
            try:
                yield
            finally:
                self.rng_state = torch.get_rng_state()
                if devices:
                    self.cuda_rng_state = torch.cuda.get_rng_state(self.device)

    def train_step(self, x0: torch.Tensor) -> float:
        """One optimizer step on a batch x0 (B, C, H, W) in [-1, 1] (Alg. 1); returns the batch's L_simple.

        With min_snr weighting, the step minimises the per-image losses weighted by min_snr_weight;
        the returned (and logged) value is always the unweighted L_simple, so runs compare.
        """
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        prediction, gen = self.diffusion_config.prediction, self.generator
        t = torch.randint(0, self.schedule.T, (len(x0),), generator=gen, device=gen.device).to(self.device)  # (B,)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            per_image = loss_simple(self.model, x0, self.schedule, prediction, t=t, generator=gen, reduction="none")  # (B,)
        if self.config.loss_weighting == "min_snr":
            loss = (min_snr_weight(t, self.schedule, self.config.min_snr_gamma, prediction) * per_image).mean()
        else:
            loss = per_image.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        self.losses.append(per_image.mean().item())
        return self.losses[-1]

    def fit(
        self,
        steps: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        progress: bool = True,
        on_sample: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        """Train until ``steps`` optimizer steps in total (default: the config's), checkpointing to ``checkpoint_path``.

        Every ``sample_every`` steps a grid of EMA samples is appended to ``self.samples`` and
        passed to ``on_sample(step, grid)``.
        """
        until = steps if steps is not None else self.config.steps
        cfg = self.config
        batches = EpochBatches(len(self.dataset), cfg.batch_size, cfg.seed, start_step=self.step)
        # The loader's own generator: creating its iterator would otherwise draw from the global RNG (dropout's stream).
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        bar = tqdm(total=until, initial=self.step, disable=not progress, desc="training", unit="step")
        started = time.perf_counter() - self.train_seconds
        machine = device_name(self.device)
        offset = self.machine_seconds.get(machine, 0.0) - self.train_seconds  # offset + train_seconds: time on this machine
        with self._own_rng(), bar:
            for x0, _ in loader:
                if self.step >= until:
                    break
                loss = self.train_step(x0.to(self.device, non_blocking=True))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.samples.append((self.step, self.sample_grid()))
                    if on_sample is not None:
                        on_sample(*self.samples[-1])
                self.train_seconds = time.perf_counter() - started
                self.machine_seconds[machine] = offset + self.train_seconds
                if checkpoint_path is not None and cfg.snapshot_every and self.step % cfg.snapshot_every == 0:
                    self.save(snapshot_path(checkpoint_path, self.step), full=False)
                if checkpoint_path is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save(checkpoint_path)
        if checkpoint_path is not None:
            self.save(checkpoint_path)

    def sample_grid(self, n: int = 16, steps: int = 50, seed: int = 0) -> torch.Tensor:
        """n DDIM samples of the EMA model, always from the same seed so grids compare across steps."""
        shape = (n, self.model_config.in_channels, self.model_config.image_size, self.model_config.image_size)
        generator = torch.Generator().manual_seed(seed)
        x = sample(
            self.ema.module,
            self.schedule,
            shape,
            sampler="ddim",
            steps=min(steps, self.schedule.T),
            prediction=self.diffusion_config.prediction,
            generator=generator,
        )
        return x.cpu()

    def state_dict(self, full: bool = True) -> dict:
        """The checkpoint dict; ``full=False`` keeps only the configs and EMA weights (for sharing a model)."""
        state = {
            "model_config": dataclasses.asdict(self.model_config),
            "diffusion_config": dataclasses.asdict(self.diffusion_config),
            "train_config": dataclasses.asdict(self.config),
            "ema": self.ema.module.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "machine_seconds": self.machine_seconds,
        }
        if full:
            state.update(
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                ema_updates=int(self.ema.n_averaged),
                losses=torch.tensor(self.losses),
                rng={"cpu": self.rng_state, "cuda": self.cuda_rng_state, "noise": self.generator.get_state()},
            )
        return state

    def save(self, path: str | os.PathLike, full: bool = True) -> None:
        save_checkpoint(path, self.state_dict(full))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        dataset: Dataset | None = None,
        device: str | torch.device | None = None,
        data_root: str | os.PathLike | None = None,
        **overrides,
    ) -> Trainer:
        """Resume a run from a full checkpoint; ``overrides`` change TrainConfig fields (e.g. steps)."""
        device = torch.device(device) if device is not None else default_device()
        state = load_checkpoint(path, map_location=device)
        if "optimizer" not in state:
            raise ValueError(f"{path} holds only EMA weights, not a training state; it cannot be resumed")
        train_config = dataclasses.replace(config_from_dict(TrainConfig, state["train_config"]), **overrides)
        trainer = cls(
            config_from_dict(UNetConfig, state["model_config"]),
            config_from_dict(DiffusionConfig, state["diffusion_config"]),
            train_config,
            dataset,
            device,
            data_root,
        )
        trainer.model.load_state_dict(state["model"])
        trainer.ema.module.load_state_dict(state["ema"])
        trainer.ema.n_averaged.fill_(state["ema_updates"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step = state["step"]
        trainer.train_seconds = state.get("train_seconds", 0.0)
        trainer.machine_seconds = state.get("machine_seconds", {})
        trainer.losses = state["losses"].tolist()
        trainer.rng_state = state["rng"]["cpu"].cpu()
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            trainer.cuda_rng_state = state["rng"]["cuda"].cpu()
        trainer.generator.set_state(state["rng"]["noise"].cpu())
        return trainer


@torch.inference_mode()
def loss_by_timestep(
    model: torch.nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    bins: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_simple averaged over the images x0 (B, C, H, W) at the centre timestep of each of ``bins``
    equal bins of t. Returns (t of each bin, mean loss), each of shape (bins,)."""
    centres = ((torch.arange(bins) + 0.5) * schedule.T / bins).long()
    losses = []
    with eval_mode(model):
        for t in centres.tolist():
            t_batch = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            losses.append(loss_simple(model, x0, schedule, prediction, t=t_batch, generator=generator).item())
    return centres, torch.tensor(losses)


def snapshot_path(checkpoint_path: str | os.PathLike, step: int) -> Path:
    """Where the EMA snapshot of ``step`` goes: runs/mnist.pt -> runs/mnist_step0001000.pt."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_step{step:07d}{path.suffix}")


def epochs_to_steps(epochs: float, dataset_size: int, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` passes over a dataset (incomplete batches are dropped)."""
    return max(1, math.ceil(epochs * (dataset_size // batch_size)))
