import os
import subprocess
import sys

import pytest
import torch

from ddpm_lib.checkpoint import CheckpointError, export_ema, load_checkpoint, load_model, save_checkpoint
from ddpm_lib.files import OutputPathError
from ddpm_lib.sampling import DegenerateModelError
from ddpm_lib.unet import UNet


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"ema": {"w": torch.randn(1000)}})
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create a folder: code running from a checkpoint
        return (os.mkdir, (self.marker,))


def test_checkpoint_carrying_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "ddpm_lib", "version": 1, "ema": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_other_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm_lib checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="it is a text file starting 'hello'"):
        load_checkpoint(tmp_path / "text.pt")


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_load_model_rebuilds_the_ema_model(tmp_path, tiny_config):
    import dataclasses

    model = UNet(tiny_config)
    save_checkpoint(
        tmp_path / "m.pt",
        {
            "model_config": dataclasses.asdict(tiny_config),
            "diffusion_config": {"schedule": "cosine", "T": 30, "prediction": "v"},
            "ema": model.state_dict(),
        },
    )
    loaded, diffusion = load_model(tmp_path / "m.pt")
    assert loaded.config == tiny_config and not loaded.training
    assert (diffusion.schedule, diffusion.T, diffusion.prediction) == ("cosine", 30, "v")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    save_checkpoint(tmp_path / "bad.pt", {"model_config": {}, "diffusion_config": {}, "ema": {}})
    with pytest.raises(CheckpointError, match="does not hold a usable model"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "content, says",
    [
        (b"", r"it is empty \(0 bytes\)"),
        (bytes(range(7, 250)) * 20, r"4,860 bytes of binary data, not a PyTorch file \(first bytes: 07 08 09"),  # not "pickled code"
        (bytes(600), r"600 bytes of binary data"),  # NUL bytes decode as UTF-8, yet are not text
        (b"step,loss\n1,0.9\n", "a text file starting 'step,loss'"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "it is a PNG image"),
        (b"\x93NUMPY\x01\x00" + bytes(100), r"it is a NumPy array \(.npy\)"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, content, says):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        load_checkpoint(path)


def test_a_folder_is_not_reported_as_missing(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint: it is a folder"):
        load_checkpoint(tmp_path)


def test_a_fifo_or_a_device_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)  # opening it to read would wait forever for a writer
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: it is a named pipe \(FIFO\), not a file"):
        load_checkpoint(fifo)
    with pytest.raises(CheckpointError, match="is not a checkpoint: it is a character device, not a file"):
        load_checkpoint("/dev/zero")


def test_the_legacy_format_is_refused_without_unpickling_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "ddpm_lib", "version": 1, "ema": Payload(str(marker))}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="format of PyTorch before 1.6"):
        load_checkpoint(tmp_path / "old.pt")
    assert not marker.exists()


def test_a_compressed_bomb_is_refused_from_its_directory_at_little_memory(tmp_path, deflated_bomb):
    bomb = tmp_path / "bomb.pt"
    deflated_bomb(bomb, 2**28)
    assert bomb.stat().st_size < 2**21  # 256 MiB of zeros in about 1 MiB
    with pytest.raises(CheckpointError, match=r"declares 256 MiB of data in a file of 1.\d MiB \(a compressed archive"):
        load_checkpoint(bomb)
    code = "import resource, sys; from ddpm_lib.checkpoint import load_checkpoint\n"
    code += "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    code += "before = peak()\ntry:\n    load_checkpoint(sys.argv[1])\nexcept Exception:\n    pass\nprint(peak() - before)"
    grew_kib = int(subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True).stdout)
    assert grew_kib < 64 * 1024  # inflating the record would take 256 MiB


def model_state(config, **changes):
    import dataclasses

    return {
        "model_config": dataclasses.asdict(config),
        "diffusion_config": {"schedule": "linear", "T": 10, "prediction": "eps"},
        "ema": UNet(config).state_dict(),
        **changes,
    }


def test_weights_with_nan_or_inf_are_never_saved_and_never_loaded(tmp_path, tiny_config):
    state = model_state(tiny_config)
    save_checkpoint(tmp_path / "good.pt", state)
    before = (tmp_path / "good.pt").read_bytes()
    bad = {k: v.clone() for k, v in state["ema"].items()}
    bad["stem.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf in 1 of its .* ema tensors .*stem.weight.*diverged"):
        save_checkpoint(tmp_path / "good.pt", {**state, "ema": bad})
    assert (tmp_path / "good.pt").read_bytes() == before
    torch.save({"format": "ddpm_lib", "version": 1, **state, "ema": bad}, tmp_path / "nan.pt")  # as an older ddpm_lib wrote it
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_model(tmp_path / "nan.pt")


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"model_config": "unet"}, "UNetConfig is a str, not a dict"),
        ({"diffusion_config": [1000]}, "DiffusionConfig is a list, not a dict"),
        ({"ema": {"stem.weight": torch.zeros(3)}}, "Missing key"),
        ({"ema": "weights"}, "does not hold a usable model"),
        # the probe's case: a string field once failed as "'<' not supported ...", naming no field
        ({"model_config": {"patch_size": "2"}}, "patch_size must be a whole number from 1 to 4,096, got '2'"),
        ({"model_config": {"dropout": "0.1"}}, "dropout must be in \\[0, 1\\), got '0.1'"),
        ({"model_config": {"channel_mults": 4}}, "channel_mults must be a tuple of whole numbers, got 4"),
        ({"model_config": {"attention_resolutions": ["7"]}}, "attention_resolutions must be a tuple of whole numbers"),
    ],
)
def test_a_checkpoint_that_loads_but_is_wrong_inside_is_one_clear_error(tmp_path, tiny_config, changes, says):
    state = model_state(tiny_config)
    if isinstance(changes.get("model_config"), dict):  # one field changed
        changes = {"model_config": {**state["model_config"], **changes["model_config"]}}
    save_checkpoint(tmp_path / "m.pt", {**state, **changes})
    with pytest.raises(CheckpointError, match=says):
        load_model(tmp_path / "m.pt")


def test_export_refuses_an_existing_file_and_an_unusable_model(tmp_path, tiny_config):
    state = model_state(tiny_config, train_config={}, step=3)
    # A fresh U-Net's zero output layer predicts 0 for every input, which export refuses as untrained: perturb it.
    state["ema"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(tmp_path / "run.pt", state)
    (tmp_path / "other.pt").write_bytes(b"another run's training state")
    with pytest.raises(OutputPathError, match="exists"):
        export_ema(tmp_path / "run.pt", tmp_path / "other.pt")
    assert (tmp_path / "other.pt").read_bytes() == b"another run's training state"
    export_ema(tmp_path / "run.pt", tmp_path / "other.pt", overwrite=True)
    assert load_checkpoint(tmp_path / "other.pt")["step"] == 3
    save_checkpoint(tmp_path / "mismatch.pt", {**state, "model_config": {**state["model_config"], "base_channels": 16}})
    with pytest.raises(CheckpointError, match="does not hold a usable model"):
        export_ema(tmp_path / "mismatch.pt", tmp_path / "small.pt")
    save_checkpoint(tmp_path / "blown.pt", {**state, "ema": {k: v * 1e29 for k, v in state["ema"].items()}})  # finite, blown up
    with pytest.raises(DegenerateModelError, match="the training run blew up"):
        export_ema(tmp_path / "blown.pt", tmp_path / "small.pt")
    assert not (tmp_path / "small.pt").exists()
    with pytest.raises(OutputPathError, match="is the checkpoint being exported"):  # even with overwrite, by another name
        export_ema(tmp_path / "run.pt", tmp_path / "." / "run.pt", overwrite=True)
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 3
