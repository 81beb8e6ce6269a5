"""Data-parallel training on CPU: gloo, 2 processes, started as torchrun starts them."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from ddpm_lib.cli import main
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.distributed import Rank, from_env
from ddpm_lib.training import EpochBatches, TrainConfig, Trainer
from ddpm_lib.unet import UNetConfig

MODEL = UNetConfig(
    in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_groups=4
)
CONFIG = TrainConfig(batch_size=8, steps=3, precision="fp32", sample_every=0, checkpoint_every=0, warmup_steps=0)
IMAGES = (16, 8)  # conftest's images fixture: 16 images of 8x8, which batches of 4 split over 2 ranks
TINY_MODEL = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (64,), generator=g))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        trainer = Trainer(MODEL, DiffusionConfig(T=50), CONFIG, dataset(), "cpu")
        trainer.fit(1, progress=False)
        first = weights(trainer)
        trainer.fit(3, progress=False)
        torch.save({"first": first, "last": weights(trainer), "losses": trainer.losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_both_ranks_end_with_identical_weights(two_ranks):
    for name, value in two_ranks[0]["last"].items():
        assert torch.equal(value, two_ranks[1]["last"][name]), name
    assert two_ranks[0]["losses"] == two_ranks[1]["losses"]  # the global batch's loss, on every rank


def test_a_two_rank_step_with_global_batch_b_matches_one_process_with_batch_b(two_ranks):
    single = Trainer(MODEL, DiffusionConfig(T=50), CONFIG, dataset(), "cpu")
    before = weights(single)
    single.fit(1, progress=False)
    # The same images, t and eps, so the same gradient up to the order of float sums; AdamW's first
    # step moves each weight by about lr * sign(gradient), so the tolerance is a small share of lr.
    tolerance = 1e-3 * CONFIG.lr
    for name, value in weights(single).items():
        moved = (value - before[name]).abs().max().item()
        assert (value - two_ranks[0]["first"][name]).abs().max().item() <= tolerance, name
        assert moved <= 1.01 * CONFIG.lr  # the step did move the weights (by up to lr) ...
    assert any((value - before[name]).abs().max() > 0.5 * CONFIG.lr for name, value in weights(single).items())  # ... really
    assert single.losses[0] == pytest.approx(two_ranks[0]["losses"][0], rel=1e-6)


def test_each_rank_reads_its_share_of_every_global_batch():
    whole = EpochBatches(40, 8, seed=3, start_step=5)
    shares = [EpochBatches(40, 8, seed=3, start_step=5, rank=Rank(r, 2)) for r in range(2)]
    for _, batch, first, second in zip(range(12), whole, *shares, strict=False):  # across epochs too (5 batches each)
        assert first + second == batch
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        EpochBatches(40, 8, seed=0, rank=Rank(0, 3))


def test_the_rank_comes_from_torchrun_s_environment(monkeypatch):
    assert from_env() == Rank()  # no torchrun: one process
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank = from_env()
    assert rank == Rank(1, 4, 1) and rank.distributed and not rank.is_main and rank.share(8) == slice(2, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK must be in 0 ... WORLD_SIZE - 1"):
        from_env()


# --- The command line under torchrun ---


def train_args(images, out, *extra) -> list[str]:
    common = ["train", "--dataset", "folder", "--data-root", str(images), "--image-size", "8", "--T", "20", "--batch-size", "4"]
    return [*common, "--sample-every", "0", "--precision", "fp32", *TINY_MODEL, *extra, "--out", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddpm_lib", *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, and theirs, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *descendants(process.pid)]:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("the distributed run hung") from None
    return process.returncode, err


def test_a_killed_distributed_run_resumes_to_where_an_uninterrupted_one_ends(images, tmp_path):
    steps = ["--steps", "60", "--checkpoint-every", "5"]
    code, err = finish(torchrun(*train_args(images, tmp_path / "whole.pt", *steps)))
    assert code == 0, err
    assert "training on 2 ranks of cpu" in err and "2 images per rank and step" in err
    killed = torchrun(*train_args(images, tmp_path / "killed.pt", *steps))
    while not (tmp_path / "killed.pt").exists() and killed.poll() is None:
        time.sleep(0.02)
    for pid in [killed.pid, *descendants(killed.pid)]:  # every process of the run (torchrun's workers sit in their own sessions)
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    reached = torch.load(tmp_path / "killed.pt", weights_only=True)["step"]
    assert 5 <= reached < 60
    code, err = finish(torchrun(*train_args(images, tmp_path / "killed.pt", *steps, "--resume")))
    assert code == 0, err
    whole, resumed = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("whole", "killed"))
    assert resumed["step"] == whole["step"] == 60
    for part in ("model", "ema"):
        for name, value in whole[part].items():
            torch.testing.assert_close(resumed[part][name], value, rtol=0, atol=0, msg=f"{part}.{name}")
    assert resumed["losses"].tolist() == whole["losses"].tolist()


def test_checkpoints_move_between_one_process_and_several(images, tmp_path, capsys):
    assert main(train_args(images, tmp_path / "one.pt", "--steps", "4")) == 0  # one process ...
    code, err = finish(torchrun(*train_args(images, tmp_path / "one.pt", "--steps", "8", "--resume")))  # ... resumed on 2 ranks
    assert code == 0, err
    assert main(train_args(images, tmp_path / "one.pt", "--steps", "10", "--resume")) == 0  # and back on one
    assert main(["export", "--checkpoint", str(tmp_path / "one.pt"), "--out", str(tmp_path / "ema.pt")]) == 0
    out = tmp_path / "samples.png"
    assert (
        main(["sample", "--checkpoint", str(tmp_path / "one.pt"), "--num", "4", "--sampler", "ddim", "--steps", "5", "--out", str(out)])
        == 0
    )
    assert out.stat().st_size > 0


def ranks(*args: str, world: int = 2) -> list[tuple[int, str]]:
    """Start ``world`` ranks as torchrun would (its environment variables) and collect each one's exit status and stderr."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {
            **ENV,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "-m", "ddpm_lib", *args]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        )
    return [finish(p, timeout=120) for p in processes]


@pytest.mark.parametrize(
    "case, extra, status, says",
    [
        ("one rank cannot write --out", ["--steps", "2"], 2, "does not exist"),
        ("a batch that does not split", ["--steps", "2", "--batch-size", "5"], 2, "batch_size 5 is the global batch"),
        ("a missing dataset", ["--steps", "2", "--data-root", "/nonexistent/images"], 2, "/nonexistent/images"),
        ("a diverging loss", ["--steps", "50", "--lr", "1e30"], 3, "training diverged at step"),
    ],
)
def test_when_one_rank_fails_every_rank_stops_with_the_same_line_and_status(images, tmp_path, case, extra, status, says):
    out = tmp_path / "run.pt"
    if case.startswith("one rank"):
        out = tmp_path / "missing" / "run.pt"  # rank 0 alone checks and writes --out
    results = ranks(*train_args(images, out, *extra))
    lines = [err.strip().splitlines()[-1] if err.strip() else "" for _, err in results]
    assert [code for code, _ in results] == [status, status], results
    assert lines[0] == lines[1] and lines[0].startswith("python -m ddpm_lib train: error:") and says in lines[0], results
    assert all("Traceback" not in err for _, err in results), results


def test_torchrun_exits_1_and_its_report_carries_each_rank_s_status_and_one_line(images, tmp_path):
    code, err = finish(torchrun(*train_args(images, tmp_path / "run.pt", "--steps", "2", "--data-root", "/nonexistent/images")))
    assert code == 1  # torchrun's own status, whatever the ranks' (docs/cli.md)
    line = "python -m ddpm_lib train: error: dataset 'folder': no image files"
    assert err.count(line) == 4, err  # each rank's stderr, then each rank's block of torchrun's report
    assert err.count("exitcode  : 2 (pid") == 2 and err.count("(exit status 2)") == 2, err
    root_cause = err.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {line}" in root_cause and "To enable traceback" not in err, err


def test_ctrl_c_on_torchrun_saves_once_at_the_step_every_rank_reached(images, tmp_path):
    out = tmp_path / "run.pt"
    run = torchrun(*train_args(images, out, "--steps", "5000", "--checkpoint-every", "1000"))
    while not list(tmp_path.glob(".*run.pt*")) and not out.exists() and run.poll() is None:
        time.sleep(0.05)  # the lock file beside --out: rank 0 has set up
    time.sleep(3)  # some steps, before the first checkpoint
    run.send_signal(signal.SIGINT)  # what Ctrl-C sends; torchrun passes it on to its ranks
    _, err = finish(run)
    said = re.findall(r"interrupted at step (\d+): saved", err)
    assert len(said) == 2 and said[0] == said[1], err  # both ranks, one step
    assert torch.load(out, weights_only=True)["step"] == int(said[0]) > 0
    code, err = finish(torchrun(*train_args(images, out, "--steps", str(int(said[0]) + 4), "--resume")))
    assert code == 0, err


def started(run: subprocess.Popen, tmp_path: Path) -> list[int]:
    """Wait until rank 0 of ``run`` has set up (the lock file beside --out) and a few steps ran; its ranks' pids."""
    while not list(tmp_path.glob(".*.lock")) and run.poll() is None:
        time.sleep(0.05)
    time.sleep(3)
    return descendants(run.pid)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > end:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError("the ranks outlived their launcher by a minute")
        time.sleep(0.1)


def test_ranks_whose_torchrun_is_killed_save_release_the_lock_and_exit(images, tmp_path):
    out = tmp_path / "run.pt"
    run = torchrun(*train_args(images, out, "--steps", "100000", "--checkpoint-every", "100000"))
    ranks_ = started(run, tmp_path)
    os.kill(run.pid, signal.SIGKILL)  # the launcher alone: its ranks are orphans now
    wait_gone(ranks_)
    _, err = run.communicate(timeout=60)  # the ranks held torchrun's stderr
    said = re.findall(r"torchrun, which started this rank, is gone; stopped at step (\d+): saved", err)
    assert len(said) == 2 and said[0] == said[1], err
    assert torch.load(out, weights_only=True)["step"] == int(said[0]) > 0
    code, err = finish(torchrun(*train_args(images, out, "--steps", str(int(said[0]) + 2), "--resume")))  # the lock is free
    assert code == 0, err


def test_when_a_rank_is_killed_the_other_stops_with_one_line_and_status_4(images, tmp_path):
    out = tmp_path / "run.pt"
    run = torchrun(*train_args(images, out, "--steps", "100000", "--checkpoint-every", "20"))
    ranks_ = started(run, tmp_path)
    os.kill(max(ranks_), signal.SIGKILL)  # rank 1, started second
    code, err = finish(run)
    assert code == 1
    line = re.search(r"python -m ddpm_lib train: error: lost contact with another rank at step \d+ \(.*\); .*; continue with --resume", err)
    assert line and "]: Traceback" not in err and err.count("exitcode  : 4 (pid") == 1, err  # no rank's traceback
