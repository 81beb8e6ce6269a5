"""Training: AdamW on L_simple, an EMA of the weights, checkpoints that resume exactly (Ho et al. 2020, Alg. 1)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import config_from_dict, load_checkpoint, save_checkpoint
from .data import dataset_info, get_dataset
from .diffusion import DiffusionConfig, loss_simple
from .sampling import eval_mode, sample
from .schedules import NoiseSchedule
from .unet import UNet, UNetConfig

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"  # one of data.DATASETS
    image_size: int | None = None  # None: the dataset's own size
    batch_size: int = 128  # images per optimizer step
    steps: int = 12_000  # optimizer steps in total
    lr: float = 5e-4  # peak AdamW learning rate (Ho et al.: 2e-4 for a 35 M-parameter model; small models take more)
    warmup_steps: int = 500  # the learning rate rises linearly over these first steps
    weight_decay: float = 0.0  # AdamW weight decay
    ema_decay: float = 0.9995  # EMA decay per step, warmed up as min(decay, (1 + n) / (10 + n))
    grad_clip: float = 1.0  # clip the global gradient norm to this (Ho et al.: 1.0)
    precision: str = "auto"  # "auto": bf16 autocast on CUDA GPUs that have it, else fp32; "bf16" or "fp32" to choose
    hflip: bool = False  # random horizontal flips (photos yes, digits no)
    seed: int = 0  # seeds the weights, the data order, t, the noise and dropout
    sample_every: int = 1000  # steps between sample grids of the EMA model (0: never)
    checkpoint_every: int = 1000  # steps between checkpoints when training to a file (0: only at the end)
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        dataset_info(self.dataset)  # validates the name
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid choices: {', '.join(PRECISIONS)}")
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


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
        self.dataset = dataset if dataset is not None else get_dataset(cfg.dataset, data_root, True, cfg.image_size, cfg.hflip)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = UNet(model_config).to(self.device)
            self.rng_state = torch.get_rng_state()  # the global stream dropout draws from
        self.cuda_rng_state = None
        self.ema = AveragedModel(self.model, multi_avg_fn=self._ema_update, use_buffers=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = diffusion_config.make_schedule().to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)  # t and eps of every step
        cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda_bf16)
        self.step = 0
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
        """One optimizer step on a batch x0 (B, C, H, W) in [-1, 1] (Alg. 1); returns the loss."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = loss_simple(self.model, x0, self.schedule, self.diffusion_config.prediction, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        self.losses.append(loss.item())
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


def epochs_to_steps(epochs: float, dataset_size: int, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` passes over a dataset (incomplete batches are dropped)."""
    return max(1, math.ceil(epochs * (dataset_size // batch_size)))
