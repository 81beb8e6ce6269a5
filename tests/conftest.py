import atexit
import os
import shutil
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lib.checkpoint import save_checkpoint
from ddpm_lib.unet import UNetConfig

# What ddpm_lib.classifier.predict caches on disk goes to one folder for the whole run, shared by the
# tests, the processes they start and the notebooks' kernels (all inherit it), not to ~/.cache.
if "DDPM_CACHE" not in os.environ:
    os.environ["DDPM_CACHE"] = tempfile.mkdtemp(prefix="ddpm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPM_CACHE"], True)

# A U-Net small enough to train in milliseconds: 1x8x8 images, 8 and 16 channels.
TINY = UNetConfig(
    in_channels=1,
    image_size=8,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
    num_groups=4,
    num_heads=2,
)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def tiny_config() -> UNetConfig:
    return TINY


@pytest.fixture(scope="module")
def images(request, tmp_path_factory):
    """A folder of random RGB PNGs, a dataset for --dataset folder runs: 12 of 12x12, or the module's IMAGES (count, size)."""
    count, size = getattr(request.module, "IMAGES", (12, 12))
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _deflated_bomb(path, declared: int) -> None:
    """A real checkpoint rewritten as a deflated zip whose tensor record inflates to ``declared`` zero bytes."""
    save_checkpoint(path.with_suffix(".src"), {"ema": {"w": torch.zeros(4)}})
    with zipfile.ZipFile(path.with_suffix(".src")) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with out.open(info.filename, "w", force_zip64=True) as record:
                    chunk = bytes(2**24)
                    for _ in range(declared // len(chunk)):
                        record.write(chunk)
            else:
                out.writestr(info.filename, src.read(info))


@pytest.fixture
def deflated_bomb():
    """Builds a compressed "bomb" in torch.save's format: deflated_bomb(path, declared bytes)."""
    return _deflated_bomb


@pytest.fixture(scope="session")
def flow_checkpoint(tmp_path_factory):
    """A linear-flow checkpoint (path linear_flow, velocity prediction) of a tiny U-Net, trained by the CLI for 300 steps
    on 8x8 RGB images of one bright bar on a dark ground: a model of a path other than DDPM's, from the command line."""
    from ddpm_lib.cli import main

    folder = tmp_path_factory.mktemp("bars")
    for i in range(16):
        image = np.full((8, 8, 3), 20, dtype=np.uint8)
        image[i % 8, :] = 235 if i < 8 else 20
        image[:, i % 8] = 235 if i >= 8 else image[:, i % 8]
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path_factory.mktemp("flow") / "flow.pt"
    tiny = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "4"]
    flow = ["--path", "linear_flow", "--prediction", "velocity", "--loss-weighting", "uniform"]
    common = ["--dataset", "folder", "--data-root", str(folder), "--image-size", "8", "--steps", "300", "--batch-size", "16"]
    assert main(["train", *common, *flow, *tiny, "--lr", "3e-3", "--sample-every", "0", "--seed", "0", "--out", str(out)]) == 0
    return out
