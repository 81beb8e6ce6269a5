import os

import pytest
import torch

from ddpm_lib.checkpoint import CheckpointError, export_ema, load_checkpoint, load_model, save_checkpoint
from ddpm_lib.files import OutputPathError
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
        (bytes(range(7, 250)) * 20, r"4860 bytes that are not a PyTorch file \(first bytes: 07 08 09"),  # not "pickled code"
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
    ],
)
def test_a_checkpoint_that_loads_but_is_wrong_inside_is_one_clear_error(tmp_path, tiny_config, changes, says):
    save_checkpoint(tmp_path / "m.pt", model_state(tiny_config, **changes))
    with pytest.raises(CheckpointError, match=says):
        load_model(tmp_path / "m.pt")


def test_export_refuses_an_existing_file_and_an_unusable_model(tmp_path, tiny_config):
    state = model_state(tiny_config, train_config={}, step=3)
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
    assert not (tmp_path / "small.pt").exists()
