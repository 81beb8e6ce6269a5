"""A checkpoint's network as ONNX, for runtimes without PyTorch (onnxruntime; onnxruntime-web on the site).

:func:`export_onnx` writes one file, atomically: ``model.onnx``, the EMA network and what a sampler needs besides it.

* The network. Inputs ``x`` (B, C, H, W) float32, the noisy image x_t times the path's input scale, and
  ``t`` (B,), the points' times: int64 0-based timesteps on the VP path, float32 on a continuous one (the
  metadata's ``t_type``); a class-conditional network also takes
  ``y`` (B,) int64 labels 0 ... K-1, K meaning "no label" (classifier-free guidance batches both, as
  :class:`ddpm_lib.denoiser.ClassifierFree` does). Output ``prediction`` (B, C, H, W): the raw network
  output in the checkpoint's parametrization. The batch size is free.
* The metadata, as JSON in the model's ``metadata_props`` under the key :data:`METADATA_KEY`: the
  parametrization (``prediction``, one of parametrizations.PREDICTIONS), the class count, the image shape and
  the ``path``: its grid's points for any step count (:meth:`ddpm_lib.paths.VP.export`,
  :meth:`ddpm_lib.paths.LinearFlow.export`). A runtime reads the grid from there and re-derives nothing.
  :func:`read_metadata` reads it; onnxruntime gives it as ``session.get_modelmeta().custom_metadata_map``.

Why inside the file rather than in a JSON file beside it: one file is replaced by one atomic rename,
so a failed export can never leave a network beside another network's schedule, and an export writes
nothing but the path it was given. onnxruntime in Python, C++, C# and Java reads ``metadata_props``;
onnxruntime-web has no API for it (microsoft/onnxruntime#16547), so ``make site`` copies it into a JSON
file for the page when it builds the site.

Needs the ``onnx`` extra (``pip install ".[onnx]"``): onnx and onnxscript for torch's exporter,
onnxruntime to run the result.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_output, load_checkpoint, sound_model
from .files import OutputPathError, write_atomic

OPSET = 18  # the ONNX operator set: onnxruntime and onnxruntime-web both run it
METADATA_KEY = "ddpm_lib"  # the metadata_props entry that holds the metadata as JSON
FORMAT = "ddpm-notebooks onnx export 3"  # 1 wrote the metadata beside the model, as model.json; 2 held alpha_bar, not the path


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write the EMA network of ``checkpoint``, with its metadata, as ONNX to ``out`` (see the module doc).

    Refuses to replace ``out`` unless ``overwrite``, and ``out`` is never the checkpoint itself; checks
    that it can be written, that the checkpoint loads and that its network makes sound predictions
    (a blown-up run is refused) before anything is written. Returns the metadata.
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise OutputPathError(f"{out}: an ONNX export is named *.onnx")
    check_output(checkpoint, out, overwrite)
    state = load_checkpoint(checkpoint)
    unet, diffusion = sound_model(state, checkpoint)
    config = unet.config
    B = 2  # an example batch; the exported graph takes any
    x = torch.randn(B, config.in_channels, config.image_size, config.image_size)
    path = diffusion.make_path()
    t = torch.tensor([p.t for p in path.grid(1)[:1]] * B)  # int64 for a VP index, float32 for a continuous time
    args = (x, t, torch.tensor([0, config.num_classes])) if config.num_classes else (x, t)
    names = ["x", "t", "y"][: len(args)]
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():  # x, t and y share one batch axis, on purpose
            warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
            program = torch.onnx.export(
                unet,  # in eval mode: (x, t) or (x, t, y) -> prediction
                args,
                input_names=names,
                output_names=["prediction"],
                dynamic_shapes={name: {0: batch} for name in names},
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except ImportError as e:  # torch's exporter imports onnx and onnxscript only now
        raise ImportError(f"ONNX export needs the onnx extra: pip install '.[onnx]' ({e})") from e
    meta = {
        "format": FORMAT,
        "inputs": names,
        "t_type": str(t.dtype).removeprefix("torch."),
        "prediction": diffusion.prediction,
        "num_classes": config.num_classes,
        "image_shape": [config.in_channels, config.image_size, config.image_size],
        "path": path.export(),
        "step": state.get("step"),
    }
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    write_atomic(out, model.SerializeToString())  # weights included: a few MB
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`export_onnx` wrote into the ONNX file ``path``; a ValueError for any other file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError, ...
        raise ValueError(f"{path} is not a readable ONNX file: {' '.join(str(e).split())}") from e
    found = {entry.key: entry.value for entry in model.metadata_props}
    if METADATA_KEY not in found:
        raise ValueError(f"{path} is an ONNX file without ddpm_lib's metadata; export it with python -m ddpm_lib export --format onnx")
    return json.loads(found[METADATA_KEY])
