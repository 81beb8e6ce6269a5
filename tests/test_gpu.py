"""The CUDA paths: training, sampling, exact resume and bf16 autocast on a GPU.

Skipped without one; make gpu-check runs them where there is one.
"""

import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.devices import fast_bf16
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.sampling import sample
from ddpm_lib.solvers import DDIM
from ddpm_lib.training import TrainConfig, Trainer
from ddpm_lib.unet import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these on one)")
CONFIG = TrainConfig(batch_size=16, steps=6, precision="fp32", sample_every=0, checkpoint_every=0)


def images() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(64, dtype=torch.long))


def test_training_runs_on_the_gpu(tiny_config):
    trainer = Trainer(tiny_config, DiffusionConfig(T=50), CONFIG, images(), "cuda")
    trainer.fit(progress=False)
    assert next(trainer.model.parameters()).is_cuda and len(trainer.losses) == 6
    assert all(0 < loss < 10 for loss in trainer.losses)


def test_sampling_on_the_gpu_is_reproducible(tiny_config):
    denoiser = guided(Denoiser(UNet(tiny_config).cuda().eval(), DiffusionConfig(T=50)))
    draws = [sample(denoiser, (4, 1, 8, 8), DDIM(10), generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0].is_cuda and draws[0].shape == (4, 1, 8, 8) and torch.equal(draws[0], draws[1])
    assert draws[0].abs().max() <= 1


def test_a_resumed_gpu_run_ends_where_an_uninterrupted_one_ends(tiny_config, tmp_path):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    whole = Trainer(tiny_config, DiffusionConfig(T=50), CONFIG, images(), "cuda")
    whole.fit(progress=False)
    part = Trainer(tiny_config, DiffusionConfig(T=50), CONFIG, images(), "cuda")
    part.fit(3, checkpoint_path=tmp_path / "run.pt", progress=False)
    resumed = Trainer.from_checkpoint(tmp_path / "run.pt", dataset=images(), device="cuda")
    resumed.fit(progress=False)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_trains_on_the_gpu(tiny_config):
    assert fast_bf16(torch.device("cuda")) == torch.cuda.is_bf16_supported()
    trainer = Trainer(tiny_config, DiffusionConfig(T=50), TrainConfig(**{**CONFIG.__dict__, "precision": "bf16"}), images(), "cuda")
    trainer.fit(progress=False)
    assert trainer.bf16 and all(0 < loss < 10 for loss in trainer.losses)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = trainer.model(torch.zeros(2, 1, 8, 8, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))
    assert out.dtype == torch.bfloat16
