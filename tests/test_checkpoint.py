import os

import pytest
import torch

from ddpm_lib.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
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
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def crash(obj, f):
        open(f, "wb").write(b"partial")
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
