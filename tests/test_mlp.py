import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.mlp import MLP, MLPConfig
from ddpm_lib.training import TrainConfig, Trainer


def test_the_mlp_maps_points_and_timesteps_to_points():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=16, depth=2))
    x, t = torch.randn(5, 2), torch.tensor([0, 1, 500, 998, 999])
    out = model(x, t)
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    assert not torch.allclose(model(x, t.flip(0)), out)  # t matters
    assert len(model.net) == 2 * 2 + 1  # two hidden Linear + SiLU pairs, then the output layer


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"hidden": 0}, "hidden must be a whole number from 1"),
        ({"time_dim": 7}, "time_dim must be even"),
        ({"num_classes": 3}, "unconditional"),
    ],
)
def test_bad_configs_are_refused(fields, says):
    with pytest.raises(ValueError, match=says):
        MLPConfig(**fields)


def test_the_trainer_trains_it_in_memory_only(tmp_path):
    data = TensorDataset(torch.randn(64, 2), torch.zeros(64))
    config = TrainConfig(dataset="toy", batch_size=16, steps=3, sample_every=0, checkpoint_every=0, precision="fp32")
    trainer = Trainer(MLPConfig(hidden=8, depth=1), DiffusionConfig(T=10), config, data, device="cpu")
    trainer.fit(progress=False)
    assert trainer.step == 3 and isinstance(trainer.ema.module, MLP)
    with pytest.raises(ValueError, match="trains in memory only"):
        trainer.fit(4, checkpoint_path=tmp_path / "toy.pt", progress=False)
    assert not (tmp_path / "toy.pt").exists()
    with pytest.raises(ValueError, match="sample_every=0"):
        Trainer(MLPConfig(), DiffusionConfig(T=10), TrainConfig(dataset="toy", sample_every=10), data, device="cpu")
    with pytest.raises(ValueError, match="model_config must be one of UNetConfig, MLPConfig"):
        Trainer(object(), DiffusionConfig(T=10), config, data, device="cpu")
