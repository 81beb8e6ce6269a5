import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from ddpm_lib import cli, generate, resources, sampling, solvers
from ddpm_lib.checkpoint import load_checkpoint, save_checkpoint
from ddpm_lib.cli import main
from ddpm_lib.data import ImageFiles, data_root
from ddpm_lib.denoiser import Denoiser
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.divergence import weight_norm
from ddpm_lib.noisy_classifier import NoisyClassifier, NoisyClassifierConfig, save_noisy_classifier
from ddpm_lib.training import Trainer, max_workers
from ddpm_lib.unet import UNet, UNetConfig

TINY_MODEL = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "4"]


def run(capsys, *args):
    """Run the CLI in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def checkpoint(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny.pt"
    code = main(
        [
            "train",
            "--dataset",
            "folder",
            "--data-root",
            str(images),
            "--image-size",
            "8",
            "--T",
            "20",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--sample-every",
            "3",
            *TINY_MODEL,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_train_writes_a_checkpoint_with_its_configs_and_sample_grids(checkpoint):
    state = load_checkpoint(checkpoint)
    assert state["step"] == 3 and state["diffusion_config"]["T"] == 20
    assert state["model_config"]["in_channels"] == 3 and state["model_config"]["image_size"] == 8
    assert state["train_config"]["dataset"] == "folder"
    assert (checkpoint.parent / "tiny_samples_0000003.png").is_file()


def test_train_resumes_and_refuses_to_overwrite(checkpoint, images, capsys, tmp_path):
    resumed = tmp_path / "resumed.pt"
    resumed.write_bytes(checkpoint.read_bytes())
    code, err = run(capsys, "train", "--dataset", "folder", "--data-root", images, "--steps", "5", "--resume", "--out", resumed)
    assert code == 0, err
    assert load_checkpoint(resumed)["step"] == 5
    code, err = run(capsys, "train", "--dataset", "folder", "--data-root", images, "--image-size", "8", "--out", resumed)
    assert_one_line_error(code, err, "exists; pass --resume")
    assert load_checkpoint(resumed)["step"] == 5


def test_train_with_patches_puts_attention_at_the_lowest_patched_resolution(images, capsys, tmp_path):
    common = ["train", "--dataset", "folder", "--data-root", images, "--image-size", "8", "--T", "10", "--steps", "1"]
    tiny = ["--batch-size", "4", "--sample-every", "0", "--base-channels", "8", "--channel-mults", "1,2"]
    code, err = run(capsys, *common, *tiny, "--patch-size", "2", "--out", tmp_path / "p.pt")
    assert code == 0, err
    config = load_checkpoint(tmp_path / "p.pt")["model_config"]
    assert config["patch_size"] == 2 and config["attention_resolutions"] == (2,)  # 8 pixels, 4 patches, halved once
    code, err = run(capsys, *common, *tiny, "--patch-size", "3", "--out", tmp_path / "q.pt")
    assert_one_line_error(code, err, "patch_size must be a positive divisor of image_size 8")
    assert not (tmp_path / "q.pt").exists()


def test_train_by_epochs_and_missing_data(images, capsys, tmp_path):
    code, err = run(
        capsys,
        "train",
        "--dataset",
        "folder",
        "--data-root",
        images,
        "--image-size",
        "8",
        "--T",
        "10",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        *TINY_MODEL,
        "--out",
        tmp_path / "e.pt",
    )
    assert code == 0, err
    assert load_checkpoint(tmp_path / "e.pt")["step"] == 6  # 12 images, batches of 4, 2 epochs
    code, err = run(
        capsys, "train", "--dataset", "folder", "--data-root", tmp_path / "none", "--image-size", "8", "--out", tmp_path / "m.pt"
    )
    assert_one_line_error(code, err, "no image files", "DDPM_DATA")
    assert not (tmp_path / "m.pt").exists()


def test_export_keeps_configs_and_ema_weights_only(checkpoint, capsys, tmp_path):
    code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", tmp_path / "small.pt")
    assert code == 0, err
    full, small = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "small.pt")
    configs = {"model_config", "diffusion_config", "train_config"}
    assert set(small) == {"format", "version", *configs, "ema", "step", "losses", "train_seconds", "machine_seconds"}
    assert torch.equal(small["losses"], full["losses"])
    assert all(torch.equal(small["ema"][k], full["ema"][k]) for k in full["ema"])
    assert (tmp_path / "small.pt").stat().st_size < checkpoint.stat().st_size / 2
    code, err = run(
        capsys, "sample", "--checkpoint", tmp_path / "small.pt", "--num", 2, "--sampler", "ddim", "--steps", 2, "--out", tmp_path / "s.npy"
    )
    assert code == 0, err
    code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", checkpoint)
    assert_one_line_error(code, err, "is the checkpoint being exported")


@pytest.mark.parametrize(
    "sampler_args", [["--sampler", "ddpm"], ["--sampler", "ddim", "--steps", "5"], ["--sampler", "ddim", "--eta", "1"]]
)
def test_sample_writes_a_uint8_array_and_is_reproducible(checkpoint, capsys, tmp_path, sampler_args):
    for name in ("a.npy", "b.npy"):
        code, err = run(capsys, "sample", "--checkpoint", checkpoint, "--num", 5, "--seed", 7, *sampler_args, "--out", tmp_path / name)
        assert code == 0, err
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (5, 3, 8, 8) and a.dtype == np.uint8 and np.array_equal(a, b)


def test_sample_writes_a_png_grid(checkpoint, capsys, tmp_path):
    code, err = run(
        capsys, "sample", "--checkpoint", checkpoint, "--num", 4, "--sampler", "ddim", "--steps", 3, "--out", tmp_path / "g.png"
    )
    assert code == 0, err
    assert iio.imread(tmp_path / "g.png").shape == (22, 22, 3)  # 2 x 2 grid of 8 px images, 2 px padding


def test_gif_writes_the_reverse_diffusion(checkpoint, capsys, tmp_path):
    code, err = run(capsys, "gif", "--checkpoint", checkpoint, "--num", 4, "--frames", 7, "--levels", 4, "--out", tmp_path / "r.gif")
    assert code == 0, err
    frames = iio.imread(tmp_path / "r.gif", index=None)
    assert frames.shape[0] == 7 and frames.shape[2] > 2 * frames.shape[1]  # x_t and predicted x0 side by side
    assert set(np.unique(frames)) <= {0, 85, 170, 255}  # 4 grey levels
    code, err = run(capsys, "gif", "--checkpoint", checkpoint, "--levels", 300, "--out", tmp_path / "bad.gif")
    assert_one_line_error(code, err, "--levels", "between 2 and 256")
    assert not (tmp_path / "bad.gif").exists()


@pytest.mark.parametrize(
    "command, option", [("train", "--resume"), ("export", "--checkpoint"), ("sample", "--sampler"), ("gif", "--frames")]
)
def test_every_subcommand_has_help(command, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and option in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--sampler", "euler"], ["invalid choice: 'euler'"]),
        (["--sampler", "ddim", "--steps", "21"], ["between 1 and T=20"]),
        (
            ["--sampler", "ddpm", "--steps", "5"],
            ["DDPM visits all T=20 steps; use one of ddim, heun, dpmpp2m, dpmpp3m, dpmpp3m-published for 5 steps"],
        ),
        (["--sampler", "heun", "--eta", "0.5"], ["the heun solver takes steps, not eta"]),
        (["--num", "0"], ["--num: must be a whole number >= 1, got '0'"]),
        (["--num", "-3"], ["--num: must be a whole number >= 1, got '-3'"]),
        (["--sampler", "ddim", "--eta", "-1"], ["eta must be a finite number >= 0, got -1.0"]),
        (["--seed", str(2**70)], ["argument --seed: must be at most 4,294,967,295, got 1180591620717411303424"]),
        (["--seed", "-1"], ["argument --seed: must be a whole number >= 0"]),
        (["--num", str(10**30)], [f"--num {10**30:,} (", "of samples) would need", "of memory; this machine has"]),
        (["--num", "100000"], ["--num 100,000 (73.2 MiB of samples) would write 28.6 MiB; ", "has 1.0 MiB free"]),
        (["--steps", str(2**63)], ["argument --steps: must be at most 9,223,372,036,854,775,807"]),
    ],
)
def test_bad_sampling_arguments_exit_with_one_line(checkpoint, capsys, tmp_path, monkeypatch, args, fragments):
    monkeypatch.setattr(resources, "free_disk", lambda folder: 2**20)  # 1 MiB free beside --out
    code, err = run(capsys, "sample", "--checkpoint", checkpoint, *args, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "x.png").exists()


def test_missing_corrupt_and_unsafe_checkpoints_and_bad_outputs(checkpoint, capsys, tmp_path):
    code, err = run(capsys, "sample", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    code, err = run(capsys, "gif", "--checkpoint", corrupt, "--out", tmp_path / "x.gif")
    assert_one_line_error(code, err, "not a readable checkpoint")
    code, err = run(capsys, "sample", "--checkpoint", checkpoint, "--out", tmp_path / "no" / "such" / "dir" / "x.png")
    assert_one_line_error(code, err, "does not exist")
    code, err = run(capsys, "sample", "--checkpoint", checkpoint, "--out", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".png or .npy")


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_lib", "sample", "--checkpoint", str(tmp_path / "nope.pt"), "--out", "x.png"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- Nothing lost, nothing silent (issue 19) ---


def tiny_train(images, out, *extra):
    """A train command line on the 12 random 8x8 images."""
    common = ["train", "--dataset", "folder", "--data-root", images, "--image-size", "8", "--T", "20", "--batch-size", "4"]
    return [*common, "--sample-every", "0", *TINY_MODEL, *extra, "--out", out]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a training or sampling step runs: for errors that must come before any work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a training or sampling step ran before the error")

    monkeypatch.setattr(Trainer, "train_step", forbidden)
    monkeypatch.setattr(Denoiser, "__call__", forbidden)  # called once per sampling step


def test_a_blow_up_before_nan_saves_nothing_and_names_a_good_checkpoint(checkpoint, images, capsys, tmp_path):
    run_file = tmp_path / "run.pt"
    run_file.write_bytes(checkpoint.read_bytes())
    # One step at this rate takes the weights to about 1e29, still finite: saved at once, it used to replace the good file.
    args = ("--resume", "--lr", "1e30", "--steps", "50", "--checkpoint-every", "1", "--snapshot-every", "1")
    code, err = run(capsys, *tiny_train(images, run_file, *args))
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 3 and last.startswith("python -m ddpm_lib train: error: training diverged at step 4") and "Traceback" not in err, err
    assert "the weights' norm jumped from" in last and "is unchanged (step 3)" in last and "try a lower --lr (this run: 1e+30)" in last
    assert run_file.read_bytes() == checkpoint.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.pt.lock", "run.pt"]  # no snapshot of the blown-up step
    code, err = run(capsys, "sample", "--checkpoint", run_file, "--num", 4, "--sampler", "ddim", "--steps", 5, "--out", tmp_path / "ok.png")
    assert code == 0, err  # the state the message names samples


def test_a_slow_blow_up_never_creeps_into_the_checkpoint(checkpoint, images, capsys, tmp_path):
    """The probe's case: a constant high lr grew the weights 17x in 31 steps, no step reaching the 2x jump, while
    --checkpoint-every 1 replaced the checkpoint with every worse state."""
    run_file = tmp_path / "run.pt"
    run_file.write_bytes(checkpoint.read_bytes())
    args = ("--resume", "--lr", "0.2", "--lr-schedule", "constant", "--warmup-steps", "0", "--steps", "100", "--checkpoint-every", "1")
    code, err = run(capsys, *tiny_train(images, run_file, *args))
    last = err.strip().splitlines()[-1]
    assert code == 3 and "the weights' norm went from" in last and "at the checkpoint of step 3" in last and "a slow blow-up" in last, err
    held = int(re.search(r"holds step (\d+), its last checkpoint", last)[1])
    norm = weight_norm(load_checkpoint(run_file)["model"].values())
    start = weight_norm(load_checkpoint(checkpoint)["model"].values())
    assert 3 < held < 100 and load_checkpoint(run_file)["step"] == held and 1 / 4 < norm / start < 4


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_goes_bad_mid_run_stops_it_as_ctrl_c_does(images, capsys, tmp_path, monkeypatch, workers):
    """The probe's case: a folder image that broke after the check before training crashed the run with a traceback,
    losing the steps since the last checkpoint."""
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    victim, calls = folder / "5.png", []
    real = ImageFiles.__getitem__

    def truncating(self, i):  # the 40th image read (in step 10) finds 5.png cut short, as a disk or a user might leave it
        calls.append(i)
        if len(calls) == 40:
            victim.write_bytes(victim.read_bytes()[:60])
        return real(self, i)

    monkeypatch.setattr(ImageFiles, "__getitem__", truncating)
    out = tmp_path / "run.pt"
    code, err = run(capsys, *tiny_train(folder, out, "--steps", "100", "--checkpoint-every", "1000", "--num-workers", workers))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert f"{victim} decoded before training but no longer does" in last and "repair or remove the file, then --resume" in last, last
    step = int(re.search(r"stopped at step (\d+): saved", last)[1])
    assert 5 <= step <= 10 and load_checkpoint(out)["step"] == step  # the steps trained so far are kept
    victim.unlink()
    code, err = run(capsys, *tiny_train(folder, out, "--steps", str(step + 2), "--resume"))
    assert code == 0, err


def scaled_ema(checkpoint, path, factor):
    """``checkpoint`` with its EMA weights times ``factor``: 1e29 is a blown-up run (issue 29), 0 a network that learned nothing."""
    state = load_checkpoint(checkpoint)
    state["ema"] = {k: v * factor if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(path, state)
    return path


@pytest.mark.parametrize("factor, says", [(1e29, "the training run blew up"), (0.0, "predicts the same value for every input")])
def test_sample_and_gif_refuse_a_blown_up_or_empty_model_instead_of_drawing_black(checkpoint, capsys, tmp_path, factor, says):
    bad = scaled_ema(checkpoint, tmp_path / "bad.pt", factor)
    for command, out in (("sample", "x.png"), ("gif", "x.gif")):
        code, err = run(capsys, command, "--checkpoint", bad, "--num", 4, "--out", tmp_path / out)
        assert_one_line_error(code, err, says)
        assert not (tmp_path / out).exists()


def test_flat_or_broken_finished_samples_are_an_error_and_write_nothing(checkpoint, capsys, tmp_path, monkeypatch):
    def flat(steps):
        for step in steps:
            yield step if step.t != -1 else step._replace(x_t=torch.full_like(step.x_t, -1.0))

    real_loop = sampling.sample_loop
    monkeypatch.setattr(sampling, "sample_loop", lambda *a, **k: flat(real_loop(*a, **k)))
    monkeypatch.setattr(generate, "sample_loop", sampling.sample_loop)
    for command, out in (("sample", "x.png"), ("gif", "x.gif")):
        code, err = run(capsys, command, "--checkpoint", checkpoint, "--num", 3, "--sampler", "ddim", "--steps", 3, "--out", tmp_path / out)
        assert_one_line_error(code, err, "all 3 samples are flat images of one grey level")
        assert not (tmp_path / out).exists()


def test_sample_and_gif_refuse_a_checkpoint_with_nan_weights(checkpoint, capsys, tmp_path):
    state = load_checkpoint(checkpoint)
    state["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "nan.pt")  # as ddpm_lib before this check wrote a diverged run
    for command, out in (("sample", "x.png"), ("gif", "x.gif")):
        code, err = run(capsys, command, "--checkpoint", tmp_path / "nan.pt", "--out", tmp_path / out)
        assert_one_line_error(code, err, "NaN or inf", "diverged")
        assert not (tmp_path / out).exists()


def train_process(images, out, *extra) -> subprocess.Popen:
    args = [str(a) for a in tiny_train(images, out, "--steps", "100000", *extra)]
    return subprocess.Popen([sys.executable, "-m", "ddpm_lib", *args], stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_runs_on_one_out_exactly_one_proceeds_and_a_killed_one_blocks_nothing(images, capsys, tmp_path):
    out = tmp_path / "run.pt"
    runs = [train_process(images, out, "--checkpoint-every", "5") for _ in range(2)]
    try:
        wait_for(lambda: any(r.poll() is not None for r in runs), "one of two runs to refuse")
        loser = next(r for r in runs if r.poll() is not None)
        winner = next(r for r in runs if r is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2 and f"{out} is in use by another run" in err and "Traceback" not in err, err
        wait_for(out.exists, "the running one to checkpoint")
        assert winner.poll() is None  # still training
        resumed = subprocess.run(
            [sys.executable, "-m", "ddpm_lib", *map(str, tiny_train(images, out, "--resume"))], capture_output=True, text=True
        )
        assert resumed.returncode == 2 and "in use by another run" in resumed.stderr  # resuming is refused too
    finally:
        for r in runs:
            r.kill()
            r.wait()
    stale = tmp_path / f".run.pt.ddpm-{winner.pid}-abcdefgh.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"half a checkpoint")
    step = load_checkpoint(out)["step"]
    code, err = run(capsys, *tiny_train(images, out, "--resume", "--steps", step + 1))  # the dead run's lock blocks nothing
    assert code == 0, err
    assert load_checkpoint(out)["step"] == step + 1 and not stale.exists()


def test_ctrl_c_saves_the_checkpoint_and_exits_130(images, tmp_path):
    out = tmp_path / "run.pt"
    training = train_process(images, out, "--sample-every", "5")
    try:
        wait_for((tmp_path / "run_samples_0000005.png").exists, "five training steps")
        training.send_signal(signal.SIGINT)
        err = training.communicate(timeout=60)[1]
    finally:
        training.kill()
    last = err.strip().splitlines()[-1]
    assert training.returncode == 130 and "Traceback" not in err, err
    step = load_checkpoint(out)["step"]
    assert step >= 5 and last == f"python -m ddpm_lib train: interrupted at step {step}: saved {out}; continue with --resume"


def test_unwritable_outputs_and_missing_devices_fail_before_any_work(checkpoint, images, capsys, tmp_path, no_work):
    if Path("/proc/self").is_dir():  # os.access says yes to root here, but no file can be made
        for args in (tiny_train(images, "/proc/run.pt", "--steps", "5"), ["sample", "--checkpoint", checkpoint, "--out", "/proc/x.npy"]):
            code, err = run(capsys, *args)
            assert_one_line_error(code, err, "cannot write /proc/")
    devices = ["foo"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for device in devices:
        for args in (tiny_train(images, tmp_path / "d.pt"), ["sample", "--checkpoint", checkpoint, "--out", tmp_path / "x.png"]):
            code, err = run(capsys, *args, "--device", device)
            assert_one_line_error(code, err, f"device '{device}'" if device != "foo" else "unknown device 'foo'")
            assert "corrupt" not in err
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "x.png").exists()


def test_a_write_that_fails_at_the_end_is_one_line_and_keeps_the_file_there(checkpoint, capsys, tmp_path, monkeypatch):
    out = tmp_path / "x.npy"
    out.write_bytes(b"the user's earlier samples")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    code, err = run(capsys, "sample", "--checkpoint", checkpoint, "--num", 2, "--sampler", "ddim", "--steps", 2, "--out", out)
    assert_one_line_error(code, err, f"cannot write {out}: no space left on device")
    assert out.read_bytes() == b"the user's earlier samples" and [p.name for p in tmp_path.iterdir()] == ["x.npy"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--epochs", "0"], "--epochs: must be a whole number >= 1, got '0'"),
        (["--epochs", "-1"], "--epochs: must be a whole number >= 1"),
        (["--epochs", "inf"], "--epochs: must be a whole number >= 1, got 'inf'"),
        (["--epochs", "1.5"], "--epochs: must be a whole number >= 1"),
        (["--steps", "0"], "--steps: must be a whole number >= 1"),
        (["--lr", "nan"], "--lr: must be a finite number, got 'nan'"),
        (["--lr", "0"], "lr must be a finite number > 0"),
        (["--ema-decay", "1"], r"ema_decay must be in [0, 1), got 1.0"),
        (["--ema-decay", "-0.1"], "ema_decay must be in [0, 1)"),
        (["--warmup-steps", "-1"], "--warmup-steps: must be a whole number >= 0"),
        (["--sample-every", "-1"], "--sample-every: must be a whole number >= 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every: must be a whole number >= 0"),
        (["--snapshot-every", "-2"], "--snapshot-every: must be a whole number >= 0"),
        (["--channel-mults", "1,0"], "--channel-mults: must be a whole number >= 1, got '0'"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--num-workers", str(10**9)], f"--num-workers: must be at most {max_workers()}, got 1000000000"),  # was a fork storm
    ],
)
def test_out_of_range_training_values_are_refused_in_one_line(images, capsys, tmp_path, no_work, args, says):
    code, err = run(capsys, *tiny_train(images, tmp_path / "x.pt", *args))
    assert_one_line_error(code, err, says)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("eta", ["nan", "inf", "-inf"])
def test_non_finite_eta_is_refused(checkpoint, capsys, tmp_path, no_work, eta):
    code, err = run(capsys, "sample", "--checkpoint", checkpoint, "--sampler", "ddim", f"--eta={eta}", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, f"--eta: must be a finite number, got '{eta}'")


def test_export_refuses_an_existing_out_unless_forced(checkpoint, capsys, tmp_path):
    other_run = tmp_path / "other.pt"
    other_run.write_bytes(checkpoint.read_bytes())
    code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", other_run)
    assert_one_line_error(code, err, f"{other_run} exists", "--force")
    assert other_run.read_bytes() == checkpoint.read_bytes()  # still resumable
    code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", other_run, "--force")
    assert code == 0, err
    assert "optimizer" not in load_checkpoint(other_run)


@pytest.mark.parametrize(
    "out, says",
    [
        ("/proc/x.pt", "cannot write /proc/x.pt"),  # was "in use by another run": the lock came first
        ("{tmp}/missing/x.pt", "folder {tmp}/missing does not exist"),  # was created silently, and left with a lock file
        ("{tmp}", "it is a folder"),  # was "exists ... pass --force"
    ],
)
def test_export_checks_its_output_path_before_it_locks_or_creates_anything(checkpoint, capsys, tmp_path, out, says):
    out, says = out.format(tmp=tmp_path), says.format(tmp=tmp_path)
    for force in ([], ["--force"]):
        code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", out, *force)
        assert_one_line_error(code, err, says)
        assert "in use" not in err and sorted(tmp_path.iterdir()) == []


def test_export_of_a_blown_up_model_and_its_bound_are_refused(checkpoint, capsys, tmp_path):
    bad = scaled_ema(checkpoint, tmp_path / "bad.pt", 1e29)
    code, err = run(capsys, "export", "--checkpoint", bad, "--out", tmp_path / "small.pt")
    assert_one_line_error(code, err, "the training run blew up")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]
    code, err = run(capsys, "nll", "--checkpoint", bad, "--dataset", "mnist", "--num", 1)  # refused before the data is read
    assert_one_line_error(code, err, "the training run blew up")


def test_any_legal_output_name_works(checkpoint, capsys, tmp_path):
    """The probe's case: a 250-character name was refused as "file name too long" (its temporary and lock names are longer)."""
    long = tmp_path / ("d" * 246 + ".pt")
    code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", long)
    assert code == 0, err
    assert load_checkpoint(long)["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == [long.name]
    code, err = run(
        capsys, "sample", "--checkpoint", checkpoint, "--num", 2, "--sampler", "ddim", "--steps", 2, "--out", long.with_suffix(".png")
    )
    assert code == 0, err
    code, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", tmp_path / ("d" * 256 + ".pt"))  # not legal: said so
    assert_one_line_error(code, err, "its name has 259 bytes, more than the 255 a file name may have here")


def test_train_refuses_an_out_whose_grids_or_snapshots_would_need_too_long_a_name(images, capsys, tmp_path):
    out = tmp_path / ("r" * 246 + ".pt")  # legal, but run_samples_0001000.png is not
    code, err = run(capsys, *tiny_train(images, out, "--steps", "2", "--sample-every", "1"))
    assert_one_line_error(code, err, "more than the 255", "choose a shorter --out, or pass --sample-every 0")
    code, err = run(capsys, *tiny_train(images, out, "--steps", "2", "--snapshot-every", "1"))
    assert_one_line_error(code, err, "choose a shorter --out, or pass --snapshot-every 0")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    code, err = run(capsys, *tiny_train(images, out, "--steps", "2"))  # --sample-every 0: the name itself works
    assert code == 0, err


def test_resume_applies_the_flags_it_may_change_and_refuses_the_rest(checkpoint, images, capsys, tmp_path):
    out = tmp_path / "run.pt"
    out.write_bytes(checkpoint.read_bytes())
    code, err = run(capsys, *tiny_train(images, out, "--resume", "--batch-size", "2", "--base-channels", "16", "--steps", "5"))
    assert_one_line_error(code, err, "--resume cannot change --batch-size (saved: 4), --base-channels (saved: 8)")
    for steps in ("3", "2"):
        code, err = run(capsys, *tiny_train(images, out, "--resume", "--steps", steps))
        assert_one_line_error(code, err, f"--steps {steps} is not above the step {out} has reached (3)")
    code, err = run(capsys, *tiny_train(images, out, "--resume"))
    assert_one_line_error(code, err, "is complete (3 of 3 steps)")
    assert out.read_bytes() == checkpoint.read_bytes()  # the refusals changed nothing, not even the saved steps
    # the same shape flags as saved are fine (the README's resume command repeats the first one); --lr changes
    code, err = run(capsys, *tiny_train(images, out, "--resume", "--steps", "5", "--lr", "5e-4", "--precision", "fp32"))
    assert code == 0, err
    saved = load_checkpoint(out)["train_config"]
    assert (saved["steps"], saved["lr"], saved["precision"], saved["batch_size"]) == (5, 5e-4, "fp32", 4)


def test_train_help_says_which_flags_resume_may_change(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "only --steps, --epochs, --lr, --lr-schedule, --warmup-steps, --ema-decay" in text
    assert "Under torchrun every rank ends so, but torchrun itself exits 1 and prints its own report" in text


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("model_config", "unet", "UNetConfig is a str, not a dict"),
        ("rng", None, "lacks 'rng'"),
        ("optimizer", {"state": 1}, "lacks 'param_groups'"),
    ],
)
def test_checkpoints_that_load_but_are_wrong_inside_are_one_line(checkpoint, images, capsys, tmp_path, key, value, says):
    state = load_checkpoint(checkpoint)
    state = {k: v for k, v in state.items() if k != key} if value is None else {**state, key: value}
    torch.save(state, tmp_path / "bad.pt")
    command = ["sample", "--checkpoint", tmp_path / "bad.pt", "--out", tmp_path / "x.png"] if key == "model_config" else None
    code, err = run(capsys, *(command or tiny_train(images, tmp_path / "bad.pt", "--resume", "--steps", "9")))
    assert_one_line_error(code, err, says)
    if key == "model_config":
        code, err = run(capsys, "export", "--checkpoint", tmp_path / "bad.pt", "--out", tmp_path / "small.pt")
        assert_one_line_error(code, err, says)
        assert not (tmp_path / "small.pt").exists()


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(capsys, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (tmp_path / "folder.pt").mkdir()
    for name, says in (("empty.pt", "it is empty (0 bytes)"), ("random.pt", "not a PyTorch file"), ("folder.pt", "it is a folder")):
        code, err = run(capsys, "sample", "--checkpoint", tmp_path / name, "--out", tmp_path / "x.png")
        assert_one_line_error(code, err, says)
        assert "pickled" not in err and "does not exist" not in err


def test_gif_runs_the_network_in_batches_and_draws_the_same_digits(checkpoint, capsys, tmp_path, monkeypatch):
    seen = []
    forward = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: seen.append(len(x)) or forward(self, x, t))
    monkeypatch.setattr(generate, "BATCH", 2)
    gif_args = ["gif", "--checkpoint", checkpoint, "--num", 5, "--sampler", "ddim", "--steps", 3, "--frames", 4, "--levels", 256]
    code, err = run(capsys, *gif_args, "--no-x0", "--out", tmp_path / "r.gif")
    assert code == 0, err
    assert seen == [2, 2] * 3 + [2, 2, 1] * 3  # the network checked on 4 images at 3 t, then 3 DDIM steps of 5, all in batches of 2
    monkeypatch.setattr(generate, "BATCH", 256)
    code, err = run(capsys, *gif_args, "--no-x0", "--out", tmp_path / "whole.gif")
    assert code == 0, err
    batched, whole = (iio.imread(tmp_path / name, index=None) for name in ("r.gif", "whole.gif"))
    assert np.abs(batched.astype(int) - whole.astype(int)).max() <= 1  # the same random draws: the same digits


@pytest.mark.skipif(not (data_root() / "MNIST" / "raw").is_dir(), reason="no MNIST copy under the data root (set DDPM_DATA)")
def test_nll_prints_the_terms_and_ends_with_the_bound(capsys, tmp_path):
    config = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_groups=4, num_heads=2)
    diffusion = {"schedule": "linear", "T": 12, "prediction": "eps"}
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in UNet(config).state_dict().items()}  # a zero output layer is refused
    save_checkpoint(tmp_path / "m.pt", {"model_config": dataclasses.asdict(config), "diffusion_config": diffusion, "ema": ema})
    capsys.readouterr()
    assert main(["nll", "--checkpoint", str(tmp_path / "m.pt"), "--num", "3", "--seed", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "variational bound on the first 3 mnist test images (seed 0), bits/dim, 0-based t:"
    assert [line.split()[0] for line in lines[1:-1]] == ["prior", "KL", "KL", "KL", "KL", "L_0"]
    assert re.fullmatch(r"bits/dim: \d+\.\d{4}", lines[-1])
    terms = sum(float(line.split()[-1]) for line in lines[1:-1])
    assert terms == pytest.approx(float(lines[-1].split()[-1]), abs=1e-3)


def test_nll_refuses_a_model_of_a_folder_of_images(checkpoint, capsys):
    code, err = run(capsys, "nll", "--checkpoint", checkpoint, "--num", 2)
    assert_one_line_error(code, err, "trained on a folder of images, which has no test split; pass --dataset")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_checkpoint_of_each_parametrization_samples_with_every_solver_and_no_prediction_flag(images, capsys, tmp_path, prediction):
    out = tmp_path / f"{prediction}.pt"
    code, err = run(capsys, *tiny_train(images, out, "--prediction", prediction, "--steps", "3", "--warmup-steps", "0", "--lr", "0.05"))
    assert code == 0, err
    for solver, steps in (("ddpm", None), ("ddim", 4), ("heun", 3), ("dpmpp2m", 4)):
        args = [
            "sample",
            "--checkpoint",
            out,
            "--num",
            3,
            "--sampler",
            solver,
            *(["--steps", steps] if steps else []),
            "--out",
            tmp_path / "x.npy",
        ]
        code, err = run(capsys, *args)
        assert code == 0, err
        assert np.load(tmp_path / "x.npy").shape == (3, 3, 8, 8)


# --- Hostile files and absurd requests (issue 29) ---


def test_a_fifo_or_a_device_anywhere_a_checkpoint_goes_is_refused_at_once(checkpoint, images, tmp_path):
    """In a real process with a time limit: opening a FIFO to describe it used to wait forever. One process runs
    every command in turn (importing torch once), printing each one's exit status after its message."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    commands = [
        ["sample", "--checkpoint", fifo, "--out", tmp_path / "x.png"],
        ["sample", "--checkpoint", "/dev/zero", "--out", tmp_path / "x.png"],
        ["export", "--checkpoint", fifo, "--out", tmp_path / "small.pt"],
        ["nll", "--checkpoint", fifo],
        ["sample", "--checkpoint", checkpoint, "--label", "1", "--classifier", fifo, "--out", tmp_path / "x.png"],
        tiny_train(images, tmp_path / "new.pt", "--init", fifo),
        tiny_train(images, fifo, "--resume"),
    ]
    child = "\n".join(
        [
            "import json, sys",
            "from ddpm_lib.cli import main",
            "for args in json.loads(sys.argv[1]):",
            "    print('status', main(args), file=sys.stderr)",
        ]
    )
    argv = json.dumps([[str(a) for a in args] for args in commands])
    result = subprocess.run([sys.executable, "-c", child, argv], capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and "Traceback" not in result.stderr and len(lines) == 2 * len(commands), result.stderr
    for args, message, status in zip(commands, lines[::2], lines[1::2], strict=True):
        assert status == "status 2" and "not a file" in message, (args, message)
    assert "/dev/zero is not a checkpoint: it is a character device, not a file" in lines[2]


@pytest.mark.parametrize(
    "where, value, says",
    [
        ("diffusion_config", {"T": 10**8}, "T must be a whole number from 1 to 100,000, got 100000000"),
        ("diffusion_config", {"T": 10**12}, "T must be a whole number from 1 to 100,000, got 1000000000000"),
        ("model_config", {"base_channels": 10**9}, "base_channels must be a whole number from 1 to 4,096"),
        ("model_config", {"base_channels": 4096, "channel_mults": [1, 2, 64], "num_groups": 8}, "parameters, more than the 1,073,741,824"),
    ],
)
def test_a_checkpoint_asking_for_absurd_sizes_is_refused_before_any_allocation(checkpoint, images, capsys, tmp_path, where, value, says):
    state = load_checkpoint(checkpoint)
    state[where] = {**state[where], **value}
    torch.save(state, tmp_path / "absurd.pt")
    for args in (
        ["sample", "--checkpoint", tmp_path / "absurd.pt", "--out", tmp_path / "x.png"],
        ["export", "--checkpoint", tmp_path / "absurd.pt", "--out", tmp_path / "small.pt"],
        ["train", "--dataset", "folder", "--data-root", images, "--resume", "--steps", "9", "--out", tmp_path / "absurd.pt"],
    ):
        code, err = run(capsys, *args)
        assert_one_line_error(code, err, says)


def test_a_folder_with_corrupt_images_trains_on_the_rest_and_says_how_many_it_skipped(images, capsys, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images.iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.png").write_bytes((images / "0.png").read_bytes()[:60])
    (folder / "empty.png").write_bytes(b"")
    args = tiny_train(folder, tmp_path / "run.pt", "--steps", "2")
    code, err = run(capsys, *args)
    assert code == 0, err
    assert "training on cpu" in err and ", 12 images, steps 0 -> 2" in err
    assert "skipped 2 files, e.g. broken.png: " in err and "(they do not decode as images)" in err
    for image in folder.glob("[0-9]*.png"):
        image.write_bytes(b"not a png")
    code, err = run(capsys, *tiny_train(folder, tmp_path / "none.pt", "--steps", "2"))
    assert_one_line_error(code, err, "none of the 14 image files in", "decodes (14 files, e.g. ")
    assert not (tmp_path / "none.pt").exists()


def test_gif_durations_beyond_what_a_gif_can_store_are_refused(checkpoint, capsys, tmp_path):
    code, err = run(capsys, "gif", "--checkpoint", checkpoint, "--duration-ms", 10**7, "--out", tmp_path / "x.gif")
    assert_one_line_error(code, err, "argument --duration-ms: must be at most 655,350, got 10000000")


def test_under_torchrun_the_one_line_error_is_left_for_torchruns_report(checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    code, err = run(capsys, "sample", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "x.png")
    assert code == 2
    report = json.loads((tmp_path / "error.json").read_text())["message"]
    assert report["message"] == report["extraInfo"]["py_callstack"] == err.strip() + " (exit status 2)"
    assert int(report["extraInfo"]["timestamp"]) > 0


# --- class labels and guidance ---------------------------------------------------------------

GUIDED_DIFFUSION = {"schedule": "linear", "T": 12, "prediction": "eps"}


def save_model(path: Path, num_classes: int) -> Path:
    torch.manual_seed(0)
    config = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_groups=4, num_heads=2)
    config = dataclasses.replace(config, num_classes=num_classes)
    model = UNet(config)
    with torch.no_grad():  # a U-Net starts with zero output layers, and sample refuses a network whose output is constant
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    state = {"model_config": dataclasses.asdict(config), "diffusion_config": GUIDED_DIFFUSION, "ema": model.state_dict()}
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    """A class-conditional model (3 classes), an unconditional one, and a noisy classifier of 3 classes for their schedule."""
    folder = tmp_path_factory.mktemp("guided")
    classifier = NoisyClassifier(NoisyClassifierConfig(image_size=8, num_classes=3, base_channels=8, channel_mults=(1, 2), num_groups=4))
    save_noisy_classifier(folder / "c.pt", classifier, DiffusionConfig(**GUIDED_DIFFUSION), {0: 1.0}, train_images=0)
    return {"cfg": save_model(folder / "cfg.pt", 3), "uncond": save_model(folder / "u.pt", 0), "classifier": folder / "c.pt"}


@pytest.fixture
def sampled_labels(monkeypatch):
    """The labels (and guidance arguments) each batch's denoiser is guided with."""
    calls = []
    real = generate.guided

    def spy(denoiser, labels=None, **guide):
        calls.append({"labels": labels, **guide})
        return real(denoiser, labels, **guide)

    monkeypatch.setattr(generate, "guided", spy)
    return calls


@pytest.mark.parametrize(
    "label, expected",
    [("2", [2] * 6), ("0,2", [0, 0, 0, 2, 2, 2]), ("all", [0, 0, 1, 1, 2, 2]), ("ALL", [0, 0, 1, 1, 2, 2])],
)
def test_label_gives_one_class_a_list_or_equal_blocks_of_all(guided, capsys, tmp_path, sampled_labels, label, expected):
    code, err = run(capsys, "sample", "--checkpoint", guided["cfg"], "--num", 6, "--label", label, "--out", tmp_path / "x.npy")
    assert code == 0, err
    (call,) = sampled_labels
    assert call["labels"].tolist() == expected and call["guidance"] == cli.DEFAULT_GUIDANCE
    assert np.load(tmp_path / "x.npy").shape == (6, 1, 8, 8)


def test_labels_follow_their_images_across_batches(guided, capsys, tmp_path, sampled_labels, monkeypatch):
    monkeypatch.setattr(generate, "BATCH", 4)
    args = ["--num", 6, "--label", "all", "--guidance", 0, "--out", tmp_path / "x.npy"]
    code, err = run(capsys, "sample", "--checkpoint", guided["cfg"], *args)
    assert code == 0, err
    assert [call["labels"].tolist() for call in sampled_labels] == [[0, 0, 1, 1], [2, 2]]
    assert all(call["guidance"] == 0 for call in sampled_labels)


def test_no_label_samples_a_conditional_model_unconditionally(guided, capsys, tmp_path, sampled_labels):
    code, err = run(capsys, "sample", "--checkpoint", guided["cfg"], "--num", 2, "--out", tmp_path / "x.npy")
    assert code == 0, err
    assert sampled_labels[0]["labels"] is None and "guidance" not in sampled_labels[0]


def test_a_classifier_guides_an_unconditional_model(guided, capsys, tmp_path, sampled_labels):
    args = ["sample", "--checkpoint", guided["uncond"], "--num", 3, "--sampler", "ddim", "--steps", 4, "--seed", 1]
    code, err = run(capsys, *args, "--classifier", guided["classifier"], "--label", 1, "--classifier-scale", 5, "--out", tmp_path / "g.npy")
    assert code == 0, err
    call = sampled_labels[-1]
    assert call["labels"].tolist() == [1, 1, 1] and call["classifier_scale"] == 5 and "guidance" not in call
    code, err = run(capsys, *args, "--out", tmp_path / "plain.npy")
    assert code == 0, err
    assert not np.array_equal(np.load(tmp_path / "g.npy"), np.load(tmp_path / "plain.npy"))  # the same noise, steered


def test_gif_takes_labels_and_guidance(guided, capsys, tmp_path):
    args = ["gif", "--checkpoint", guided["cfg"], "--num", 3, "--label", "all", "--guidance", 1, "--frames", 4, "--out", tmp_path / "r.gif"]
    code, err = run(capsys, *args)
    assert code == 0, err
    assert iio.imread(tmp_path / "r.gif", index=None).shape[0] == 4


@pytest.mark.parametrize(
    "model, args, says",
    [
        ("cfg", ["--label", "3"], "--label 3 is out of range: this model knows classes 0 ... 2"),
        ("cfg", ["--label", "0,7"], "--label 7 is out of range"),
        ("cfg", ["--label", "-1"], "--label: must be a class number >= 0"),
        ("cfg", ["--label", "two"], "--label: must be a class number >= 0, a comma-separated list of them, or 'all'"),
        ("cfg", ["--label", "all", "--num", "2"], "--num 2 is fewer images than the 3 classes asked for"),
        ("cfg", ["--guidance", "2"], "--guidance needs --label"),
        ("uncond", ["--label", "1"], "is an unconditional model; add --classifier to guide it toward a class"),
        ("uncond", ["--label", "1", "--guidance", "2"], "--guidance: {model} is an unconditional model"),
        ("uncond", ["--classifier", "{classifier}"], "--classifier needs --label"),
        ("uncond", ["--label", "1", "--classifier-scale", "2"], "--classifier-scale needs --classifier"),
        ("uncond", ["--label", "1", "--classifier", "{cfg}"], "is not a noisy classifier"),
        ("cfg", ["--guidance", "nan", "--label", "1"], "--guidance: must be a finite number"),
    ],
)
def test_bad_labels_and_guidance_are_one_line_errors(guided, capsys, tmp_path, model, args, says):
    names = {"model": guided[model], **guided}
    args = [str(a).format(**names) for a in args]
    code, err = run(capsys, "sample", "--checkpoint", guided[model], "--num", 4, *args, "--out", tmp_path / "x.npy")
    assert_one_line_error(code, err, says.format(**names))
    assert not (tmp_path / "x.npy").exists()


def test_a_classifier_for_another_schedule_is_refused(guided, capsys, tmp_path):
    classifier = NoisyClassifier(NoisyClassifierConfig(image_size=8, num_classes=3, base_channels=8, channel_mults=(1, 2), num_groups=4))
    save_noisy_classifier(tmp_path / "c.pt", classifier, DiffusionConfig(T=1000), {}, train_images=0)
    args = ["--label", 1, "--classifier", tmp_path / "c.pt", "--out", tmp_path / "x.npy"]
    code, err = run(capsys, "sample", "--checkpoint", guided["uncond"], *args)
    assert_one_line_error(code, err, "does not fit", "T=1000, the model uses linear with T=12")


def test_a_real_process_refuses_guidance_on_an_unconditional_model_with_exit_2(guided, tmp_path):
    args = ["sample", "--checkpoint", guided["uncond"], "--guidance", "2", "--label", "1", "--out", tmp_path / "x.npy"]
    result = subprocess.run([sys.executable, "-m", "ddpm_lib", *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unconditional model" in result.stderr


def test_train_init_starts_from_a_checkpoint_and_takes_its_shape(checkpoint, images, capsys, tmp_path):
    out = tmp_path / "init.pt"
    code, err = run(capsys, *tiny_train(images, out, "--init", checkpoint))
    assert_one_line_error(code, err, "--init takes the U-Net and diffusion settings from", "drop --base-channels")
    base = ["train", "--dataset", "folder", "--data-root", images, "--image-size", 8, "--steps", 1, "--batch-size", 4]
    code, err = run(capsys, *base, "--lr", 1e-12, "--sample-every", 0, "--init", checkpoint, "--out", out)
    assert code == 0, err
    state, source = load_checkpoint(out), load_checkpoint(checkpoint)
    assert state["model_config"] == source["model_config"] and state["diffusion_config"] == source["diffusion_config"]
    assert state["train_config"]["init"] == str(checkpoint)
    for name, weight in source["ema"].items():  # one step at a vanishing learning rate: still the source's weights
        assert torch.allclose(state["ema"][name], weight, atol=1e-6), name
    code, err = run(capsys, *base[:-4], "--init", checkpoint, "--resume", "--steps", 6, "--out", out)
    assert_one_line_error(code, err, "--init starts a new run")


@pytest.mark.skipif(not (data_root() / "FashionMNIST" / "raw").is_dir(), reason="no Fashion-MNIST copy under the data root (set DDPM_DATA)")
def test_a_short_fashion_mnist_run_trains_and_samples(capsys, tmp_path):
    out = tmp_path / "fashion.pt"
    model = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "14"]
    code, err = run(capsys, "train", "--dataset", "fashion-mnist", "--steps", "3", "--batch-size", "8", "--T", "20", *model, "--out", out)
    assert code == 0, err
    assert "60000 images" in err and load_checkpoint(out)["train_config"]["dataset"] == "fashion-mnist"
    code, err = run(capsys, "sample", "--checkpoint", out, "--num", "4", "--sampler", "ddim", "--steps", "5", "--out", tmp_path / "x.npy")
    assert code == 0, err
    assert np.load(tmp_path / "x.npy").shape == (4, 1, 28, 28)


def test_a_solver_registered_in_one_class_is_a_sampler_of_the_cli(checkpoint, capsys, tmp_path, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Euler(solvers.Solver):  # Euler's method on the probability-flow ODE, written afresh: DDIM with eta = 0
        name: ClassVar[str] = "euler"
        title: ClassVar[str] = "Euler (a test)"
        summary: ClassVar[str] = "a solver added by one class"

        def __call__(self, denoiser, x, grid, noise):
            for i, (p, p_next) in enumerate(zip(grid, grid[1:], strict=False)):
                pred = denoiser(x, p)
                yield sampling.SamplerStep(i, p, x, pred.x0)
                x = p_next.alpha * pred.x0 + p_next.sigma * pred.eps
            yield sampling.SamplerStep(len(grid) - 1, grid[-1], x, x)

    monkeypatch.setitem(solvers.SOLVERS, "euler", None)  # taken out again after the test
    solvers.register(Euler)
    parser_help = cli.build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "euler: a solver added by one class" in " ".join(parser_help.split())
    for sampler in ("euler", "ddim"):
        code, err = run(
            capsys,
            "sample",
            "--checkpoint",
            checkpoint,
            "--num",
            3,
            "--sampler",
            sampler,
            "--steps",
            4,
            "--out",
            tmp_path / f"{sampler}.npy",
        )
        assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "euler.npy"), np.load(tmp_path / "ddim.npy"))  # Euler is deterministic DDIM
    code, err = run(capsys, "sample", "--checkpoint", checkpoint, "--sampler", "midpoint", "--out", tmp_path / "x.npy")
    assert_one_line_error(code, err, "invalid choice: 'midpoint'", "'euler'")


@pytest.mark.parametrize("path", ["vp", "linear_flow"])
def test_a_short_run_of_each_path_trains_resumes_bit_exactly_and_samples(images, capsys, tmp_path, path):
    objective = ["--path", path] + (["--prediction", "velocity", "--time-sampling", "logit_normal"] if path == "linear_flow" else [])
    whole, split = tmp_path / "whole.pt", tmp_path / "split.pt"
    assert run(capsys, *tiny_train(images, whole, *objective, "--steps", "6"))[0] == 0
    assert run(capsys, *tiny_train(images, split, *objective, "--steps", "3"))[0] == 0
    code, err = run(capsys, *tiny_train(images, split, *objective, "--steps", "6", "--resume"))
    assert code == 0, err
    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert torch.equal(a["losses"], b["losses"]) and len(a["losses"]) == 6  # as if never stopped
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["diffusion_config"]["path"] == path
    assert a["train_config"]["time_sampling"] == ("logit_normal" if path == "linear_flow" else "uniform")
    steps = ["--steps", 4] if path == "linear_flow" else []  # without --sampler: ddim on the flow, ddpm (all T) on vp
    code, err = run(capsys, "sample", "--checkpoint", whole, "--num", 2, *steps, "--out", tmp_path / "x.npy")
    assert code == 0, err
    code, err = run(capsys, *tiny_train(images, tmp_path / "vp.pt", "--time-sampling", "logit_normal", "--steps", "1"))
    assert_one_line_error(code, err, "the vp path draws training times uniform, not logit_normal")
