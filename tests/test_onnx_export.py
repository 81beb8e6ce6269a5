"""The shipped networks as ONNX, run by onnxruntime: the same predictions and the same DDIM trajectories as PyTorch."""

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_lib.checkpoint import load_checkpoint, load_model, save_checkpoint
from ddpm_lib.cli import main
from ddpm_lib.denoiser import ClassifierFree, Denoiser, Prediction
from ddpm_lib.onnx_export import METADATA_KEY, read_metadata
from ddpm_lib.parametrizations import PARAMETRIZATIONS
from ddpm_lib.paths import GridPoint
from ddpm_lib.sampling import sample_loop
from ddpm_lib.solvers import DDIM, DPMSolverPP3M

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install '.[onnx]')")

CHECKPOINTS = Path(__file__).parents[1] / "checkpoints"
sys.path.insert(0, str(CHECKPOINTS.parent / "scripts"))
import build_site  # noqa: E402

SHIPPED = ["mnist_ddpm.pt", "mnist_cfg.pt"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each shipped checkpoint exported once, the unconditional one through the CLI:
    name -> (onnxruntime session, metadata, PyTorch model, diffusion config, the .onnx path)."""
    folder = tmp_path_factory.mktemp("onnx")
    models = {}
    for name in SHIPPED:
        out = folder / name.replace(".pt", ".onnx")
        if name == "mnist_ddpm.pt":
            assert main(["export", "--format", "onnx", "--checkpoint", str(CHECKPOINTS / name), "--out", str(out)]) == 0
        else:  # export_onnx through make site's cache of it: the export the site bundles, made once a test run
            out = build_site.exported_model(name.removesuffix(".pt"))
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])  # as onnxruntime in any language reads it
        assert read_metadata(out) == meta
        models[name] = (session, meta, *load_model(CHECKPOINTS / name), out)
    return models


class OnnxDenoiser:
    """The exported network behind the library's denoiser interface, so the library's own solvers drive it."""

    batch_size, device = None, torch.device("cpu")

    def __init__(self, session, meta: dict, path):
        self.session, self.meta, self.path, self.num_classes = session, meta, path, meta["num_classes"]

    def __call__(self, x_t: torch.Tensor, p: GridPoint, y: torch.Tensor | None = None) -> Prediction:
        feeds = {"x": x_t.numpy() * self.path.input_scale(p), "t": np.full(len(x_t), p.t, dtype=self.meta["t_type"])}
        if self.num_classes:
            feeds["y"] = (y if y is not None else torch.full((len(x_t),), self.num_classes)).numpy().astype(np.int64)
        output = torch.from_numpy(self.session.run(None, feeds)[0])
        return Prediction(*PARAMETRIZATIONS[self.meta["prediction"]].to_eps_x0(output, x_t, p.alpha, p.sigma))


@pytest.mark.parametrize("name", SHIPPED)
def test_onnxruntime_predicts_what_pytorch_predicts_at_every_t_and_label(exported, name):
    session, meta, model, diffusion, _ = exported[name]
    g = torch.Generator().manual_seed(0)
    for batch, t in ((1, 0), (3, 250), (5, 999)):  # any batch size
        x = torch.randn(batch, *meta["image_shape"], generator=g)
        ts = torch.full((batch,), t)
        feeds = {"x": x.numpy(), "t": ts.numpy()}
        labels = None
        if meta["num_classes"]:
            labels = torch.arange(batch) % (meta["num_classes"] + 1)  # "no label" (K) too
            feeds["y"] = labels.numpy()
        with torch.no_grad():
            expected = model(x, ts, labels)
        got = session.run(None, feeds)[0]
        assert got.shape == tuple(expected.shape) and np.abs(got - expected.numpy()).max() <= 1e-4, (name, t)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_ddim_20_trajectory_through_onnxruntime_matches_the_library_s(exported, name):
    session, meta, model, diffusion, _ = exported[name]
    path = diffusion.make_path()
    assert meta["prediction"] == diffusion.prediction and meta["t_type"] == "int64" and meta["path"]["grid"] == "trailing"
    assert meta["path"]["points"] == [[*path.point(t), 1.0] for t in range(diffusion.T)]  # float64, bit for bit
    reference, onnx = Denoiser(model, diffusion), OnnxDenoiser(session, meta, path)
    if meta["num_classes"]:  # classifier-free guidance: one batched pass of 2B, as the library does it
        labels = torch.tensor([3, 7, 0, 9])
        reference, onnx = ClassifierFree(reference, labels, 2.0), ClassifierFree(onnx, labels, 2.0)
    x_T = torch.randn(4, *meta["image_shape"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_steps, onnx_steps = (list(sample_loop(den, x_T.shape, DDIM(20), x_T=x_T)) for den in (reference, onnx))
    pairs = list(zip(expected_steps, onnx_steps, strict=True))
    assert len(pairs) == 21
    for expected, got in pairs:
        assert expected.t == got.t and (expected.x_t - got.x_t).abs().max() <= 1e-4, expected.t


def test_an_export_never_replaces_a_file_and_is_named_onnx(exported, tmp_path, capsys):
    out = exported["mnist_ddpm.pt"][-1]
    assert out.stat().st_size > 1e6 and read_metadata(out)["num_classes"] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist_ddpm.onnx"]  # one file: no metadata beside it, no lock left
    before = out.read_bytes()
    args = ["export", "--format", "onnx", "--checkpoint", str(CHECKPOINTS / "mnist_ddpm.pt"), "--out", str(out)]
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args[:-1], str(tmp_path / "model.pt")]) == 2 and "named *.onnx" in capsys.readouterr().err


def test_an_export_never_writes_over_its_checkpoint_or_a_file_beside_it(tmp_path, capsys):
    """The probe's case: a checkpoint named run.json, exported to run.onnx with --force, became the metadata."""
    source = tmp_path / "run.json"
    source.write_bytes((CHECKPOINTS / "mnist_ddpm.pt").read_bytes())
    notes = tmp_path / "run.txt"
    notes.write_text("the user's own file")
    before = source.read_bytes()
    args = ["export", "--format", "onnx", "--checkpoint", str(source), "--force"]
    assert main([*args, "--out", str(tmp_path / "run.onnx")]) == 0
    assert source.read_bytes() == before and notes.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.onnx", "run.txt"]
    os.link(source, tmp_path / "same.onnx")  # the checkpoint itself under an .onnx name: refused even with --force
    assert main([*args, "--out", str(tmp_path / "same.onnx")]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err and source.read_bytes() == before


def test_a_blown_up_model_is_never_exported(tmp_path, capsys):
    """The probe's case: an export of a run that blew up (finite weights of 1e29) wrote a graph that outputs NaN everywhere."""
    state = load_checkpoint(CHECKPOINTS / "mnist_ddpm.pt")
    state["ema"] = {k: v * 1e29 if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(tmp_path / "blown.pt", state)
    assert main(["export", "--format", "onnx", "--checkpoint", str(tmp_path / "blown.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "the training run blew up" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["blown.pt"]


def test_a_failed_export_leaves_the_old_file_whole(exported, tmp_path, capsys, monkeypatch):
    """The probe's case: on a full disk the network was new and its metadata old. One file is replaced whole or not at all."""
    out = tmp_path / "m.onnx"
    out.write_bytes(exported["mnist_cfg.pt"][-1].read_bytes())
    before = out.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    args = ["export", "--format", "onnx", "--checkpoint", str(CHECKPOINTS / "mnist_ddpm.pt"), "--out", str(out), "--force"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "unchanged" in err and err.count("\n") == 1, err
    assert out.read_bytes() == before and read_metadata(out)["num_classes"] == 10  # still the conditional model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file, no lock file


def test_a_linear_flow_export_carries_its_path_and_drives_the_library_solvers(flow_checkpoint, tmp_path):
    out = tmp_path / "flow.onnx"
    assert main(["export", "--format", "onnx", "--checkpoint", str(flow_checkpoint), "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["prediction"] == "velocity" and meta["t_type"] == "float32"
    assert meta["path"] == {"name": "linear_flow", "grid": "uniform", "noise": [1000.0, 0.0, 1.0], "data": [0.0, 1.0, 0.0]}
    model, diffusion = load_model(flow_checkpoint)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference, onnx = Denoiser(model, diffusion), OnnxDenoiser(session, meta, diffusion.make_path())
    x_T = torch.randn(4, *meta["image_shape"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = (list(sample_loop(den, x_T.shape, DPMSolverPP3M(8), x_T=x_T)) for den in (reference, onnx))
    for a, b in zip(expected, got, strict=True):
        assert a.point == b.point and (a.x_t - b.x_t).abs().max() <= 1e-4, a.index
