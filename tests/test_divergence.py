from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm_lib.checkpoint import load_checkpoint
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.divergence import DivergenceError, DivergenceGuard, weight_norm
from ddpm_lib.training import TrainConfig, Trainer

SHIPPED = Path(__file__).parent.parent / "checkpoints"
GUARD = DivergenceGuard()


def replay(losses: list[float], guard: DivergenceGuard = GUARD) -> None:
    """Run the guard's loss check over a run's logged losses, as training does step by step."""
    for i, loss in enumerate(losses):
        guard.check_step(i + 1, loss, 1.0, losses[:i])


@pytest.mark.parametrize("name", ["mnist_ddpm.pt", "mnist_cfg.pt"])
def test_the_shipped_runs_never_trip_the_loss_check(name):
    losses = load_checkpoint(SHIPPED / name)["losses"].tolist()
    assert len(losses) >= 8_000
    replay(losses)  # 30,000 and 8,000 steps of the shipped recipe: not one false alarm


def test_a_spike_far_above_the_recent_median_is_a_blow_up():
    history = [0.05] * 100
    GUARD.check_step(101, 0.9, 1.0, history)  # 18 times the median: a hard batch, not a blow-up
    GUARD.check_step(101, 1.9, 1.0, history)  # 38 times, yet below the floor of 2: no network has blown up at this loss
    with pytest.raises(DivergenceError, match=r"step 101: the loss jumped to 2.5, 50 times the median of the last 100 steps \(0.05\)"):
        GUARD.check_step(101, 2.5, 1.0, history)
    GUARD.check_step(20, 1e6, 1.0, history[:19])  # too little history to judge: only non-finite values stop the first steps
    for loss, norm, says in ((float("nan"), 1.0, "the loss is nan"), (0.1, float("inf"), "the gradient norm is inf")):
        with pytest.raises(DivergenceError, match=f"step 3: {says}"):
            GUARD.check_step(3, loss, norm, [])


def test_weights_that_jump_or_stop_being_finite_are_a_blow_up():
    GUARD.check_weights(5, 40.0, 41.0)
    GUARD.check_weights(5, 40.0, 21.0)
    with pytest.raises(DivergenceError, match=r"step 5: the weights' norm jumped from 40 to 4e\+31 in one optimizer step"):
        GUARD.check_weights(5, 40.0, 4e31)
    with pytest.raises(DivergenceError, match="jumped from 40 to 19"):
        GUARD.check_weights(5, 40.0, 19.0)
    with pytest.raises(DivergenceError, match="hold NaN or inf"):
        GUARD.check_weights(5, 40.0, float("nan"))
    for bad in ({"window": 0}, {"loss_spike": 1.0}, {"weight_jump": float("nan")}):
        with pytest.raises(ValueError):
            DivergenceGuard(**bad)


def test_a_checkpoint_is_compared_with_one_at_least_a_window_older_so_frequent_checkpoints_cannot_creep():
    saved = [(3, 20.0)] + [(s, 20.0 * 1.1 ** (s - 3)) for s in range(4, 20)]  # 10% a step: never a jump, 4x in 15 steps
    assert GUARD.reference([], 5) is None  # a fresh run's first checkpoint: nothing earlier to keep
    assert GUARD.reference(saved, 19) == (3, 20.0)  # none 100 steps older: the oldest, the state the run started from
    assert GUARD.reference([(0, 1.0), (100, 2.0), (150, 3.0)], 240) == (100, 2.0)  # the latest at least 100 steps older
    GUARD.check_drift(17, saved, 20.0 * 1.1**14)  # 3.8 times
    with pytest.raises(DivergenceError, match="went from 20 at the checkpoint of step 3 to 83.54, a slow blow-up"):
        GUARD.check_drift(18, saved, 20.0 * 1.1**15)  # 4.2 times
    with pytest.raises(DivergenceError, match="slow blow-up"):
        GUARD.check_drift(18, saved, 20.0 / 4)  # shrinking counts too
    # Healthy runs drift far less: the shipped recipe's EMA weights ended 1.76x their random start after 30,000 steps,
    # and a tiny U-Net at lr 0.05 with no warm-up 2.66x from its start (docs/experiments.md, section 4).


def test_weight_norm_is_exact_beyond_float32s_range():
    weights = [torch.full((10,), 3e29), torch.full((6,), -4e29)]  # each square overflows float32
    assert weight_norm(weights) == pytest.approx((10 * 9e58 + 6 * 16e58) ** 0.5, rel=1e-6)
    assert weight_norm([torch.tensor([3.0, 4.0])]) == 5.0
    assert weight_norm([torch.tensor([1.0, float("inf")])]) == float("inf")


def test_a_step_that_blows_up_the_weights_is_never_saved(tmp_path, tiny_config):
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(20))
    config = TrainConfig(batch_size=4, steps=3, warmup_steps=0, sample_every=0, checkpoint_every=1, precision="fp32")
    trainer = Trainer(tiny_config, DiffusionConfig(T=20), config, dataset, device="cpu")
    trainer.fit(progress=False, checkpoint_path=tmp_path / "run.pt")
    good = (tmp_path / "run.pt").read_bytes()
    wild = Trainer.from_checkpoint(tmp_path / "run.pt", dataset, device="cpu", lr=1e30, steps=10)
    with pytest.raises(DivergenceError, match="step 4: the weights' norm jumped"):
        wild.fit(progress=False, checkpoint_path=tmp_path / "run.pt")
    assert (tmp_path / "run.pt").read_bytes() == good and wild.saved_step == 3
    assert wild.diverged is not None and wild.step == 3  # the failed step is not counted
    for full in (True, False):
        with pytest.raises(DivergenceError, match="step 4: the weights that step left are never saved"):
            wild.save(tmp_path / "other.pt", full=full)
    assert not (tmp_path / "other.pt").exists()
