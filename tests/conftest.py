import numpy as np
import pytest
import torch

from ddpm_lib.unet import UNetConfig

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
