"""Training: AdamW on L_simple, an EMA of the weights, checkpoints that resume exactly (Ho et al. 2020, Alg. 1)."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import CheckpointError, check_finite, config_from_dict, load_checkpoint, nonfinite_tensors, save_checkpoint
from .data import ImageChanged, dataset_info, get_dataset
from .denoiser import Denoiser, guided
from .devices import device_name, resolve_device, use_bf16
from .diffusion import DiffusionConfig, loss_simple
from .divergence import DivergenceError, DivergenceGuard, weight_norm
from .mlp import MLP, MLPConfig
from .paths import VP
from .resources import require_model
from .sampling import eval_mode, sample
from .schedules import NoiseSchedule
from .solvers import DDIM
from .unet import UNet, UNetConfig
from .weightings import LOSS_WEIGHTINGS, loss_weights

NETWORKS = {UNetConfig: UNet, MLPConfig: MLP}  # the network each model config builds
STOPPED, BROKEN_IMAGE = 1, 2  # why fit stops before its last step (see Trainer.fit); the larger wins when ranks differ

PRECISIONS = ("auto", "bf16", "fp32")


def max_workers() -> int:
    """The most DataLoader worker processes a run may start: the CPU cores this process may use (more only compete)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


LR_SCHEDULES = ("cosine", "constant")
TIME_SAMPLINGS = ("uniform", "logit_normal")  # how training times are drawn; a path has some of them (paths.*.time_samplers)


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"  # one of data.DATASETS, or "toy": ddpm_lib.toy's points, passed to Trainer as its dataset
    image_size: int | None = None  # None: the dataset's own size
    batch_size: int = 128  # images per optimizer step over all ranks (torchrun: each of N ranks takes batch_size / N)
    steps: int = 30_000  # optimizer steps in total (the shipped recipe: 194 minutes on a 2-core CPU with bf16)
    lr: float = 1e-3  # peak AdamW learning rate for that global batch, on any number of ranks (Ho et al.: 2e-4 at 35 M parameters)
    warmup_steps: int = 200  # the learning rate rises linearly over these first steps
    lr_schedule: str = "cosine"  # after warm-up: "cosine" decays to 0 at the last step, "constant" stays (Ho et al.)
    weight_decay: float = 0.0  # AdamW weight decay
    loss_weighting: str = "min_snr"  # one of weightings.WEIGHTINGS: "uniform", L_simple (Ho et al.); "min_snr", Min-SNR-gamma (Hang et al.)
    min_snr_gamma: float = 5.0  # gamma of Min-SNR weighting (the paper's default)
    time_sampling: str = "uniform"  # training times: "uniform", or "logit_normal" on a continuous path (Esser et al. 2024)
    ema_decay: float = 0.999  # EMA decay per step, warmed up as min(decay, (1 + n) / (10 + n)); Ho et al.: 0.9999 over 800k steps
    grad_clip: float = 1.0  # clip the global gradient norm to this (Ho et al.: 1.0)
    precision: str = "auto"  # "auto": bf16 autocast where the hardware runs it fast (fast_bf16), else fp32
    hflip: bool = False  # random horizontal flips (photos yes, digits no)
    seed: int = 0  # seeds the weights, the data order, t, the noise and dropout
    sample_every: int = 1000  # steps between sample grids of the EMA model (0: never)
    checkpoint_every: int = 1000  # steps between checkpoints when training to a file (0: only at the end)
    snapshot_every: int = 0  # steps between EMA-only snapshots saved beside that file, name_step0001000.pt (0: never)
    num_workers: int = 0  # DataLoader worker processes, at most max_workers(): this machine's CPU cores
    label_dropout: float = 0.1  # class-conditional models: share of labels replaced by "no label" (Ho & Salimans 2021: 0.1-0.2)
    init: str = ""  # the checkpoint whose EMA weights the run started from ("": random weights)

    def __post_init__(self) -> None:
        if self.dataset != "toy":
            dataset_info(self.dataset)  # validates the name
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {self.loss_weighting!r}; valid choices: {', '.join(LOSS_WEIGHTINGS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {self.time_sampling!r}; valid choices: {', '.join(TIME_SAMPLINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}")
        for name in ("batch_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive whole number, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be a whole number from 0 to 2^32 - 1, got {self.seed!r}")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "snapshot_every", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {getattr(self, name)!r}")
        if self.num_workers > max_workers():  # a checkpoint saying 10^9 once forked until the OS refused
            raise ValueError(f"num_workers must be at most {max_workers()} (this machine's CPU cores), got {self.num_workers}")
        for name in ("lr", "grad_clip", "min_snr_gamma"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.label_dropout <= 1:  # also refuses NaN
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
        if not 0 <= self.ema_decay < 1:  # also refuses NaN
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Within the body, a first Ctrl-C (SIGINT) only sets a flag, which the yielded function reads, so a
    loop can stop between two steps; a second one raises KeyboardInterrupt at once.

    Outside the main thread (where Python cannot catch signals) Ctrl-C is left as it is.
    """
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


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
    ``batch_size`` is the global batch; ``rank`` keeps only its share of each (see :mod:`distributed`).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: distributed.Rank | None = None):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.share = (rank or distributed.Rank()).share(batch_size)
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, i = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            yield perm[i * self.batch_size : (i + 1) * self.batch_size][self.share].tolist()
            step += 1


class Trainer:
    """Owns the model, its EMA, the optimizer and every random stream of a training run.

    ``fit`` trains up to a step count and may be called again to continue; ``save`` and
    ``Trainer.from_checkpoint`` stop and resume a run exactly.
    """

    def __init__(
        self,
        model_config: UNetConfig | MLPConfig,
        diffusion_config: DiffusionConfig,
        train_config: TrainConfig,
        dataset: Dataset | None = None,
        device: str | torch.device | None = None,
        data_root: str | os.PathLike | None = None,
    ):
        self.model_config, self.diffusion_config, self.config = model_config, diffusion_config, train_config
        self.device = resolve_device(device)
        cfg = train_config
        if type(model_config) not in NETWORKS:
            raise ValueError(f"model_config must be one of {', '.join(c.__name__ for c in NETWORKS)}, got {type(model_config).__name__}")
        if isinstance(model_config, MLPConfig) and (dataset is None or cfg.sample_every):
            raise ValueError("the MLP trains on points passed as the dataset (ddpm_lib.toy), with sample_every=0: grids are for images")
        if dataset is None:  # decoded once unless flips are random
            dataset = get_dataset(cfg.dataset, data_root, True, cfg.image_size, cfg.hflip, in_memory=not cfg.hflip)
        self.dataset = dataset
        self.rank = distributed.current()  # rank 0 of 1 unless torchrun started this process
        if cfg.batch_size % self.rank.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is the global batch; it must split evenly over the {self.rank.world_size} ranks")
        network = NETWORKS[type(model_config)]
        require_model(network, model_config, 5, f"this run's {network.__name__}")  # weights, EMA, gradients, 2 AdamW moments
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = network(model_config).to(self.device)
            if self.rank.rank:  # every rank its own dropout stream, rank 0 that of a single process
                torch.manual_seed(cfg.seed + 1_000_003 * self.rank.rank)
            self.rng_state = torch.get_rng_state()  # the global stream dropout draws from
        self.rank_rng: list[dict] | None = None  # every rank's streams, gathered for rank 0's checkpoint
        self.net: torch.nn.Module | None = None  # the model as training calls it: itself, or wrapped in DDP on first use
        self.cuda_rng_state = None
        self._rng_live = False  # True inside _own_rng, where the global RNG is this run's stream
        self.ema = AveragedModel(self.model, multi_avg_fn=self._ema_update, use_buffers=True)
        # fused: one kernel for all parameters (a 4 ms optimizer step takes 1 ms on 2 CPU cores)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.path = diffusion_config.make_path().to(self.device)
        if cfg.time_sampling not in self.path.time_samplers:
            raise ValueError(
                f"the {self.path.name} path draws training times {' or '.join(self.path.time_samplers)}, not {cfg.time_sampling}"
            )
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)  # t and eps of every step
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.guard = DivergenceGuard()  # stops a blow-up at its step, before anything of it is saved
        self.diverged: DivergenceError | None = None  # set when a step left blown-up weights behind: they are never saved
        self.step = 0
        self.saved_step: int | None = None  # the step of the last full checkpoint written or loaded (None: none yet)
        self.saved_norms: list[tuple[int, float]] = []  # (step, weights' norm) of each checkpoint written or loaded, oldest first
        self.train_seconds = 0.0  # wall time spent in fit, over every resumed part of the run
        self.machine_seconds: dict[str, float] = {}  # that time split by device_name: resumes may run elsewhere
        self.losses: list[float] = []  # training loss of every step
        self.samples: list[tuple[int, torch.Tensor]] = []  # (step, (16, C, H, W) EMA samples in [-1, 1])

    def init_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Start this run (at step 0) from trained weights, e.g. an unconditional model's before class-conditional training.

        The only weights ``weights`` may lack are the class embedding's; they start at zero, so the
        class-conditional U-Net begins as exactly the trained model, whatever the label.
        """
        if self.step:
            raise RuntimeError(f"init_weights starts a run; this one is already at step {self.step}")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)  # shapes that differ raise here
        if unexpected or set(missing) - {"label_emb.weight"}:
            raise ValueError(f"the weights do not fit this U-Net: missing {missing}, unexpected {unexpected}")
        if missing:
            torch.nn.init.zeros_(self.model.label_emb.weight)
        self.ema.module.load_state_dict(self.model.state_dict())

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
            self._rng_live = True  # state_dict reads the live streams, so checkpoints saved inside fit resume exactly
            try:
                yield
            finally:
                self._store_rng()
                self._rng_live = False

    def _store_rng(self) -> None:
        self.rng_state = torch.get_rng_state()
        if self.device.type == "cuda":
            self.cuda_rng_state = torch.cuda.get_rng_state(self.device)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """The (b,) weights of the per-image losses at training times ``t``: the run's weighting (weightings.WEIGHTINGS)
        of each time's SNR and of how the parametrization's error scales with the x0 error there."""
        return loss_weights(self.path, t, self.diffusion_config.prediction, self.config.loss_weighting, self.config.min_snr_gamma)

    def train_step(self, x0: torch.Tensor, y: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> float:
        """One optimizer step on a batch x0 (B, C, H, W) in [-1, 1] (Alg. 1); returns the batch's L_simple.

        ``noise`` (B, C, H, W) pairs each image with its own noise: a coupling such as reflow's, whose
        dataset yields (x0, y, noise) triples (:mod:`ddpm_lib.reflow`). None draws the noise independently
        of the images, the usual independent coupling.

        A class-conditional model needs the (B,) labels ``y``; each is replaced by the "no label"
        class with probability ``label_dropout``, so that one network learns both eps(x_t, y) and
        eps(x_t) for classifier-free guidance (Ho & Salimans 2021, Alg. 1).

        A NaN or infinite loss or gradient norm, or a loss spike, raises :class:`DivergenceError`
        before the optimizer step, so the weights stay those of the last good step. Weights that
        the step made non-finite or blew up raise it after the step; the trainer then refuses to
        save them (see :mod:`ddpm_lib.divergence`).

        The step minimises the per-image losses weighted by the run's weighting (:meth:`loss_weights`);
        the returned (and logged) value is always the unweighted L_simple, so runs compare.
        """
        self.model.train()
        net = self._network()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        prediction, gen = self.diffusion_config.prediction, self.generator
        # On N ranks x0 is this rank's b = B / N images of the global batch; t, the label dropout and eps
        # are drawn for all B, in a single process's order, and each rank keeps its share.
        B = len(x0) * self.rank.world_size
        share = self.rank.share(B)
        t = self.path.training_times(B, gen, gen.device, self.config.time_sampling)[share].to(self.device)  # (b,)
        num_classes = self.model_config.num_classes
        if num_classes:
            if y is None:
                raise ValueError("a class-conditional model trains on labelled batches: pass y")
            dropped = torch.rand(B, generator=gen, device=gen.device)[share].to(self.device) < self.config.label_dropout  # (b,)
            y = torch.where(dropped, num_classes, y.to(self.device))
        else:
            y = None  # an unconditional model ignores the labels a dataset comes with
        if noise is None:
            noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=gen.device)[share]  # (b, C, H, W)
        noise = noise.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            per_image = loss_simple(net, x0, self.path, prediction, t=t, noise=noise, reduction="none", y=y)  # (b,)
        loss = (self.loss_weights(t) * per_image).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # with DDP, the gradients are averaged over the ranks here: the global batch's
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        losses = distributed.all_mean(torch.stack([loss.detach().float(), per_image.detach().mean().float()]), self.rank)
        loss_value, logged, norm_value = torch.cat([losses, grad_norm.float().reshape(1)]).tolist()  # one sync for all three
        if not math.isfinite(loss_value):  # the weighted loss: what the gradient came from
            raise DivergenceError(self.step + 1, f"the loss is {loss_value}")
        self.guard.check_step(self.step + 1, logged, norm_value, self.losses)  # before the weights take it in
        norm_before = weight_norm(self.model.parameters())
        self.optimizer.step()
        try:  # identical weights on every rank: all ranks stop here together
            self.guard.check_weights(self.step + 1, norm_before, weight_norm(self.model.parameters()))
        except DivergenceError as e:
            self.diverged = e
            raise
        self.ema.update_parameters(self.model)
        self.step += 1
        self.losses.append(logged)
        return logged

    def _network(self) -> torch.nn.Module:
        """The model, wrapped in DistributedDataParallel on several ranks (which meets the others: all ranks call it together)."""
        if self.net is None:
            self.net = self.model
            if self.rank.distributed:
                from torch.nn.parallel import DistributedDataParallel

                self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        return self.net

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

        Nothing a run wrote is ever replaced by a worse file: a blow-up (a NaN or infinite loss,
        gradient or weight, a loss spike or a jump of the weights) raises :class:`DivergenceError`
        at its step and leaves the checkpoint (and snapshots) as they were. A first Ctrl-C stops
        the run between two steps, saves the checkpoint and raises KeyboardInterrupt; a second one
        leaves at once (the checkpoint then stays as it was). Under torchrun, its SIGTERM stops a rank
        the same way, and a rank whose launcher died saves and raises :class:`distributed.LauncherGone`.
        A folder image that decoded before training but no longer does stops the run the same way
        (the checkpoint of the last finished step), raising :class:`~ddpm_lib.data.ImageChanged`.

        On several ranks every rank calls ``fit``: they stop at the same step (after a Ctrl-C on
        any of them, or a divergence), and only rank 0 draws samples, shows progress and writes files.
        """
        until = steps if steps is not None else self.config.steps
        cfg = self.config
        if checkpoint_path is not None and not isinstance(self.model_config, UNetConfig):
            raise ValueError("checkpoints hold U-Nets; the toy's MLP trains in memory only (pass no checkpoint_path)")
        # The loader's own generator: creating its iterator would otherwise draw from the global RNG (dropout's stream).
        loader = DataLoader(
            self.dataset,
            batch_sampler=EpochBatches(len(self.dataset), cfg.batch_size, cfg.seed, start_step=self.step, rank=self.rank),
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        main = self.rank.is_main
        bar = tqdm(total=until, initial=self.step, disable=not progress or not main, desc="training", unit="step")
        started = time.perf_counter() - self.train_seconds
        machine = device_name(self.device)
        offset = self.machine_seconds.get(machine, 0.0) - self.train_seconds  # offset + train_seconds: time on this machine
        written = None  # the step last written to checkpoint_path
        stop = 0  # why the loop stopped early: 0 it did not, STOPPED (Ctrl-C, torchrun's SIGTERM or death) or BROKEN_IMAGE
        with deferred_interrupt() as interrupted, self._own_rng(), bar:
            batches = iter(loader)
            while self.step < until:
                batch, broken = None, None
                if not interrupted():  # after Ctrl-C the loader's workers may be gone: fetch nothing
                    try:
                        batch = next(batches)
                    except ImageChanged as e:  # a folder image that decoded before training no longer does
                        broken = ImageChanged.clean(e)
                why = BROKEN_IMAGE if broken else STOPPED if interrupted() or distributed.stop_requested() else 0
                if stop := distributed.max_over_ranks(why, self.rank, self.device):  # agreed: all ranks stop at one step
                    break
                x0, y, *coupled = batch  # (x0, y), or (x0, y, noise) from a coupling
                loss = self.train_step(x0.to(self.device, non_blocking=True), y, *coupled)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if main and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.samples.append((self.step, self.sample_grid()))
                    if on_sample is not None:
                        on_sample(*self.samples[-1])
                self.train_seconds = time.perf_counter() - started
                self.machine_seconds[machine] = offset + self.train_seconds
                if main and checkpoint_path is not None and cfg.snapshot_every and self.step % cfg.snapshot_every == 0:
                    self.save(snapshot_path(checkpoint_path, self.step), full=False)
                if checkpoint_path is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._checkpoint(checkpoint_path)
                    written = self.step
            if checkpoint_path is not None and written != self.step:
                self._checkpoint(checkpoint_path)
            if stop == BROKEN_IMAGE:  # every rank: the message of the first rank whose image broke
                raise ImageChanged(next(m for m in distributed.gather(broken and str(broken), self.rank) if m))
            if stop:
                raise distributed.LauncherGone if distributed.launcher_gone() else KeyboardInterrupt

    def _checkpoint(self, path: str | os.PathLike) -> None:
        """Every rank: check the weights against an earlier checkpoint (identical on every rank, so all stop alike) and
        gather the ranks' random streams; rank 0: write the full checkpoint with them."""
        norm = weight_norm(self.model.parameters())
        try:
            self.guard.check_drift(self.step, self.saved_norms, norm)
        except DivergenceError as e:
            self.diverged = e
            raise
        if self.rank.distributed:
            self._store_rng()
            self.rank_rng = distributed.gather({"cpu": self.rng_state, "cuda": self.cuda_rng_state}, self.rank)
        if self.rank.is_main:
            self.save(path)
        else:
            self.saved_step = self.step
        self.saved_norms.append((self.step, norm))

    def sample_grid(self, n: int = 16, steps: int = 50, seed: int = 0) -> torch.Tensor:
        """n DDIM samples of the EMA model, always from the same seed so grids compare across steps.

        A class-conditional model draws the classes in turn (0, 1, ..., K-1, 0, ...), unguided (w = 0).
        """
        shape = (n, self.model_config.in_channels, self.model_config.image_size, self.model_config.image_size)
        generator = torch.Generator().manual_seed(seed)
        k = self.model_config.num_classes
        labels = torch.arange(n) % k if k else None
        denoiser = guided(Denoiser(self.ema.module, self.diffusion_config), labels)
        return sample(denoiser, shape, DDIM(min(steps, self.path.default_steps)), generator=generator).cpu()

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
            if self._rng_live:
                self._store_rng()
            state.update(
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                ema_updates=int(self.ema.n_averaged),
                losses=torch.tensor(self.losses),
                rng={"cpu": self.rng_state, "cuda": self.cuda_rng_state, "noise": self.generator.get_state()},
            )
            if self.rank_rng is not None:  # a distributed run: rank r resumes with its own dropout stream
                state["rng"]["ranks"] = self.rank_rng
        return state

    def save(self, path: str | os.PathLike, full: bool = True) -> None:
        """Write the checkpoint (``full=False``: a snapshot) atomically. After a step that blew up the weights,
        or with weights that hold NaN or inf, it raises DivergenceError and writes nothing."""
        if self.diverged is not None:
            raise DivergenceError(self.diverged.step, "the weights that step left are never saved; resume from the last checkpoint")
        bad = nonfinite_tensors(self.model.state_dict()) + nonfinite_tensors(self.ema.module.state_dict())
        if bad:
            raise DivergenceError(self.step, f"{len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]})")
        save_checkpoint(path, self.state_dict(full))
        if full:
            self.saved_step = self.step

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        dataset: Dataset | None = None,
        device: str | torch.device | None = None,
        data_root: str | os.PathLike | None = None,
        **overrides,
    ) -> Trainer:
        """Resume a run from a full checkpoint; ``overrides`` change TrainConfig fields (e.g. steps).

        A file that is not a complete, finite training state is a CheckpointError naming what is wrong.
        """
        return cls.from_state(load_checkpoint(path), path, dataset, device, data_root, **overrides)

    @classmethod
    def from_state(
        cls,
        state: dict,
        path: str | os.PathLike,
        dataset: Dataset | None = None,
        device: str | torch.device | None = None,
        data_root: str | os.PathLike | None = None,
        **overrides,
    ) -> Trainer:
        """:meth:`from_checkpoint` for a checkpoint already read with ``load_checkpoint(path)``."""
        model_config, diffusion_config, train_config = saved_configs(state, path, overrides)
        trainer = cls(model_config, diffusion_config, train_config, dataset, device, data_root)
        try:
            trainer._load_training_state(state)
        except KeyError as e:
            raise CheckpointError(f"{path} is not a complete training state: it lacks {e}") from e
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path} holds a training state that does not fit its model: {' '.join(str(e).split())}") from e
        check_finite(state, str(path))
        return trainer

    def _load_training_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.ema.n_averaged.fill_(int(state["ema_updates"]))
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # load_state_dict checks the counts, not the shapes
            for p in group["params"]:
                for name, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"optimizer state {name} has shape {tuple(value.shape)} for a weight of shape {tuple(p.shape)}")
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a whole number >= 0, got {step!r}")
        self.step = self.saved_step = step
        self.saved_norms = [(step, weight_norm(self.model.parameters()))]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.machine_seconds = {str(k): float(v) for k, v in state.get("machine_seconds", {}).items()}
        self.losses = state["losses"].tolist()
        rng = state["rng"]
        ranks = rng.get("ranks")
        if self.rank.rank and ranks is not None and len(ranks) == self.rank.world_size:  # the same ranks as saved
            rng = {**rng, "cpu": ranks[self.rank.rank]["cpu"], "cuda": ranks[self.rank.rank]["cuda"]}
        elif self.rank.rank:  # another number of ranks: keep this rank's own fresh stream (dropout only)
            rng = {**rng, "cpu": self.rng_state, "cuda": None}
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng["cpu"].cpu())  # raises here, not mid-training, if the state is not one
        self.rng_state = rng["cpu"].cpu()
        if self.device.type == "cuda" and rng["cuda"] is not None:
            self.cuda_rng_state = rng["cuda"].cpu()
        self.generator.set_state(rng["noise"].cpu())


def saved_configs(state: dict, path: str | os.PathLike, overrides: dict | None = None) -> tuple[UNetConfig, DiffusionConfig, TrainConfig]:
    """The three configs of a training checkpoint read with ``load_checkpoint(path)``, or a CheckpointError; ``overrides``
    replace TrainConfig fields before it is checked (a saved value this machine refuses, such as num_workers, can be changed)."""
    if "optimizer" not in state:
        raise CheckpointError(f"{path} holds only EMA weights, not a training state; it cannot be resumed")
    try:
        saved = state["train_config"]
        return (
            config_from_dict(UNetConfig, state["model_config"]),
            config_from_dict(DiffusionConfig, state["diffusion_config"]),
            config_from_dict(TrainConfig, {**saved, **(overrides or {})} if isinstance(saved, dict) else saved),
        )
    except KeyError as e:
        raise CheckpointError(f"{path} is not a complete training state: it lacks {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} holds configs this ddpm_lib cannot use: {' '.join(str(e).split())}") from e


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
            losses.append(loss_simple(model, x0, VP(schedule), prediction, t=t_batch, generator=generator).item())
    return centres, torch.tensor(losses)


def snapshot_path(checkpoint_path: str | os.PathLike, step: int) -> Path:
    """Where the EMA snapshot of ``step`` goes: runs/mnist.pt -> runs/mnist_step0001000.pt."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_step{step:07d}{path.suffix}")


def epochs_to_steps(epochs: int, dataset_size: int, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` (a positive whole number) passes over a dataset; incomplete batches are dropped."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive whole number, got {epochs!r}")
    return max(1, epochs * (dataset_size // batch_size))
