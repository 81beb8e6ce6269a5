import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lib.checkpoint import load_checkpoint
from ddpm_lib.cli import main

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
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


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
    assert_one_line_error(code, err, "must differ")


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
        (["--sampler", "ddpm", "--steps", "5"], ["--sampler ddim"]),
        (["--num", "0"], ["--num: must be a whole number >= 1, got '0'"]),
        (["--num", "-3"], ["--num: must be a whole number >= 1, got '-3'"]),
        (["--eta", "-1"], ["--eta must be >= 0"]),
    ],
)
def test_bad_sampling_arguments_exit_with_one_line(checkpoint, capsys, tmp_path, args, fragments):
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
