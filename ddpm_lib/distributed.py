"""Data-parallel training over processes started by torchrun: one rank per device, NCCL on GPUs, gloo on CPUs.

torchrun gives every process it starts RANK, WORLD_SIZE and LOCAL_RANK (and where to meet:
MASTER_ADDR, MASTER_PORT). Without them, or with WORLD_SIZE=1, a run is one plain process and
nothing here starts a process group.

The batch is global: a run with batch B on N ranks has each rank take B / N images of every batch
a single process would take, and draw t and eps for all B images (keeping its own share), so that
N ranks train on exactly the data and noise one process would, and a checkpoint resumes on any N.

A rank never dies of SIGTERM, which torchrun sends to the ranks still running once one has exited
(and passes on when it is itself told to stop): :func:`start` makes it a request to stop at the next
step, as after Ctrl-C, so every rank ends with its own status and one-line message. A rank whose
launcher is gone (``kill -9`` of torchrun) stops the same way (:func:`stop_requested`).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    """Where this process sits in a run: its rank among ``world_size`` and its device index on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, snapshots, sample grids and the log."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, n: int) -> slice:
        """This rank's slice of a global batch of ``n`` (which ``world_size`` must divide)."""
        if n % self.world_size:
            raise ValueError(f"a batch of {n} does not split evenly over {self.world_size} ranks")
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)


def from_env() -> Rank:
    """The Rank torchrun described in the environment (a single process when it did not)."""
    try:
        values = [int(os.environ.get(name, default)) for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))]
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    rank = Rank(*values)
    if not 0 <= rank.rank < rank.world_size:
        raise ValueError(f"RANK must be in 0 ... WORLD_SIZE - 1, got RANK={rank.rank}, WORLD_SIZE={rank.world_size}")
    return rank


def current() -> Rank:
    """This process's Rank in the running process group, or a single process's when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Rank()


class LauncherGone(KeyboardInterrupt):
    """The launcher that started this rank died; the run stopped and saved, as after Ctrl-C."""


_launcher: int | None = None  # the pid of the process that started this rank (torchrun), once start ran
_terminated: list[int] = []  # the SIGTERMs this rank received


def start(device: torch.device) -> tuple[Rank, torch.device]:
    """Join the process group torchrun described (if any) and return this rank and its device:
    with CUDA, GPU LOCAL_RANK of this machine; on CPUs, ``device`` itself.

    From here on, SIGTERM only asks the rank to stop (:func:`stop_requested`).
    """
    global _launcher
    rank = from_env()
    if not rank.distributed:
        return rank, device
    _launcher = os.getppid()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _terminated.append(signum))
    if device.type == "cuda":
        if rank.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {rank.local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"distributed training runs on cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, device


def launcher_gone() -> bool:
    """Whether the process that started this rank has died (``kill -9`` of torchrun): the rank's parent changed."""
    return _launcher is not None and os.getppid() != _launcher


def stop_requested() -> bool:
    """Whether this rank should stop at the next step and save, as after Ctrl-C: torchrun sent SIGTERM (another
    rank exited, or torchrun was told to stop), or the launcher is gone and nothing would supervise the run."""
    return bool(_terminated) or launcher_gone()


def ending() -> None:
    """This rank's status is decided: ignore SIGTERM for the rest of its life (its interpreter's shutdown
    included, where Python resets the handler of :func:`start` to the default), so it ends with that status."""
    if _launcher is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def lost_rank(error: BaseException) -> str | None:
    """If ``error`` says that a collective failed because another rank is gone (killed, or crashed), what it
    says, in one line; else None. NCCL raises DistError; gloo a plain RuntimeError from its TCP transport."""
    text = " ".join(str(error).split())
    if not isinstance(error, dist.DistError) and not (isinstance(error, RuntimeError) and "gloo/transport" in text):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's [source file:line] prefix
    return text.split(". ")[0] or type(error).__name__


def record_error(message: str) -> None:
    """Under torchrun, leave this rank's one-line error where torchrun's failure report reads it.

    torchrun's agent gives every rank an error file (TORCHELASTIC_ERROR_FILE) and shows the first
    one written as the "traceback" of its report; without it the report only links to the docs.
    torchrun itself still exits with status 1, whatever the ranks' statuses (see docs/cli.md).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                # the layout of torch.distributed.elastic's ErrorHandler.record_exception, with the one line as the "traceback"
                json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # the message is on stderr already; the report falls back to its link


def barrier(rank: Rank) -> None:
    """Wait until every rank gets here."""
    if rank.distributed:
        dist.barrier()


def stop() -> None:
    """Leave the process group, if this process is in one.

    The trainer's reference cycles (its EMA holds a bound method) keep the DistributedDataParallel
    wrapper alive until the garbage collector runs; collected at interpreter exit, after the group is
    gone, its reducer can abort the process ("terminate called without an active exception"), so it
    is collected here, first.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@contextmanager
def together(rank: Rank) -> Iterator[None]:
    """Run the body on every rank, then agree: when any rank raised, every rank raises the first
    failing rank's exception (the same type and message), so all stop alike and none waits for the others.

    A single process just runs the body.
    """
    if not rank.distributed:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # every kind: the others must hear of it
        error = e
    errors = gather(None if error is None else _portable(error), rank)
    failed = next((i for i, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        raise errors[failed]


def _portable(error: BaseException) -> BaseException:
    """``error`` as something all_gather_object can pickle: itself, or a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(str(error))


def all_mean(values: torch.Tensor, rank: Rank) -> torch.Tensor:
    """The mean over ranks of ``values`` (one tensor per rank, the same shape everywhere)."""
    if not rank.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)  # SUM: gloo has no AVG
    return values / rank.world_size


def max_over_ranks(value: int, rank: Rank, device: torch.device) -> int:
    """The largest ``value`` over the ranks (the same on all ranks): 0 unless some rank has a reason to stop."""
    if not rank.distributed:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather(obj: object, rank: Rank) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    if not rank.distributed:
        return [obj]
    out: list = [None] * rank.world_size
    dist.all_gather_object(out, obj)
    return out
