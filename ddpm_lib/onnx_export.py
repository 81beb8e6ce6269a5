"""A checkpoint's network as ONNX, for runtimes without PyTorch (onnxruntime; onnxruntime-web on the site).

:func:`export_onnx` writes two files, each atomically:

* ``out`` (``model.onnx``): the EMA network. Inputs ``x`` (B, C, H, W) float32, the noisy image x_t in
  [-1, 1]-scaled units as the network sees it, and ``t`` (B,) int64, 0-based timesteps; a
  class-conditional network also takes ``y`` (B,) int64 labels 0 ... K-1, K meaning "no label"
  (classifier-free guidance batches both, as :class:`ddpm_lib.denoiser.ClassifierFree` does). Output
  ``prediction`` (B, C, H, W): the raw network output in the checkpoint's parametrization.
* ``out`` with ``.json`` (``model.json``): what a sampler needs besides the network: T, the
  parametrization, the class count, the image shape and the schedule's alpha_bar (float64, index t).

The batch size is free. Needs the ``onnx`` extra (``pip install ".[onnx]"``): onnx and onnxscript
for torch's exporter, onnxruntime to run the result.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, model_from_state
from .files import OutputPathError, check_writable, write_atomic

OPSET = 18  # the ONNX operator set: onnxruntime and onnxruntime-web both run it


def sidecar(path: str | os.PathLike) -> Path:
    """Where the metadata of ``path`` goes: model.onnx -> model.json."""
    return Path(path).with_suffix(".json")


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write the EMA network of ``checkpoint`` as ONNX to ``out``, and its metadata beside it (see the module doc).

    Refuses to replace either file unless ``overwrite``; checks that both can be written, and
    that the checkpoint loads, before anything is written. Returns the metadata.
    """
    out, meta_path = Path(out), sidecar(out)
    if out.suffix != ".onnx":
        raise OutputPathError(f"{out}: an ONNX export is named *.onnx (its metadata goes beside it as {meta_path.name})")
    for path in (out, meta_path):
        if path.exists() and not overwrite:
            raise OutputPathError(f"{path} exists; export never replaces a file unless told to (overwrite=True, the CLI's --force)")
        check_writable(path)
    state = load_checkpoint(checkpoint)
    unet, diffusion = model_from_state(state, checkpoint)
    config = unet.config
    B = 2  # an example batch; the exported graph takes any
    x = torch.randn(B, config.in_channels, config.image_size, config.image_size)
    t = torch.tensor([0, diffusion.T - 1])
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
    model_bytes = program.model_proto.SerializeToString()  # weights included: a few MB
    meta = {
        "format": "ddpm-notebooks onnx export 1",
        "inputs": names,
        "T": diffusion.T,
        "schedule": diffusion.schedule,
        "prediction": diffusion.prediction,
        "num_classes": config.num_classes,
        "image_shape": [config.in_channels, config.image_size, config.image_size],
        "alpha_bar": diffusion.make_schedule().alpha_bar.tolist(),
        "step": state.get("step"),
    }
    write_atomic(out, model_bytes)
    write_atomic(meta_path, json.dumps(meta).encode())
    return meta
