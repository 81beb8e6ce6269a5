import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm_lib import devices, training
from ddpm_lib.checkpoint import CheckpointError, export_ema, load_checkpoint, load_model
from ddpm_lib.data import decoded
from ddpm_lib.diffusion import DiffusionConfig, loss_simple
from ddpm_lib.training import (
    DivergenceError,
    EpochBatches,
    TrainConfig,
    Trainer,
    deferred_interrupt,
    epochs_to_steps,
    lr_at,
)
from ddpm_lib.unet import UNet, UNetConfig
from tests.conftest import TINY

DIFFUSION = DiffusionConfig(schedule="linear", T=50)
CONFIG = TrainConfig(batch_size=4, steps=6, warmup_steps=2, sample_every=0, checkpoint_every=0, seed=3, precision="fp32")


@pytest.fixture
def dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(20))


@pytest.fixture
def dropout_config(tiny_config):
    return dataclasses.replace(tiny_config, dropout=0.3)  # exercises the saved dropout RNG stream


def assert_same_state(a: Trainer, b: Trainer):
    assert a.step == b.step and a.losses == b.losses
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.ema.module.state_dict().values(), b.ema.module.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_checkpoint_round_trip(tmp_path, dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    trainer.fit(3, progress=False)
    trainer.save(tmp_path / "run.pt")
    restored = Trainer.from_checkpoint(tmp_path / "run.pt", dataset, device="cpu")
    assert_same_state(trainer, restored)
    assert restored.config == CONFIG and restored.model_config == tiny_config and restored.diffusion_config == DIFFUSION
    assert restored.optimizer.state_dict()["state"][0]["step"] == 3
    assert restored.train_seconds == trainer.train_seconds > 0  # a resumed run keeps counting its wall time


def test_interrupted_and_resumed_run_equals_an_uninterrupted_run(tmp_path, dataset, dropout_config):
    straight = Trainer(dropout_config, DIFFUSION, CONFIG, dataset, device="cpu")
    straight.fit(progress=False)

    first = Trainer(dropout_config, DIFFUSION, CONFIG, dataset, device="cpu")
    first.fit(4, progress=False)  # 4 steps: 20 images make 5 batches, so the epoch boundary falls after the resume
    first.save(tmp_path / "run.pt")
    torch.manual_seed(12345)  # whatever the global RNG does in between must not matter
    torch.rand(100)
    resumed = Trainer.from_checkpoint(tmp_path / "run.pt", dataset, device="cpu")
    resumed.fit(progress=False)
    assert_same_state(straight, resumed)
    assert resumed.step == CONFIG.steps


def test_a_run_resumed_from_a_checkpoint_saved_mid_fit_equals_an_uninterrupted_run(tmp_path, dataset, dropout_config):
    config = dataclasses.replace(CONFIG, checkpoint_every=2, sample_every=4)
    straight = Trainer(dropout_config, DIFFUSION, config, dataset, device="cpu")
    straight.fit(progress=False)

    def keep_a_copy(step, grid):  # at step 4, before that step's save: the file holds step 2, as after a kill -9
        (tmp_path / "killed.pt").write_bytes((tmp_path / "run.pt").read_bytes())

    Trainer(dropout_config, DIFFUSION, config, dataset, device="cpu").fit(
        checkpoint_path=tmp_path / "run.pt", on_sample=keep_a_copy, progress=False
    )
    resumed = Trainer.from_checkpoint(tmp_path / "killed.pt", dataset, device="cpu")
    assert resumed.step == 2
    resumed.fit(progress=False)
    assert_same_state(straight, resumed)


def test_same_seed_same_run_different_seed_different_run(dataset, tiny_config):
    runs = []
    for seed in (1, 1, 2):
        trainer = Trainer(tiny_config, DIFFUSION, dataclasses.replace(CONFIG, seed=seed), dataset, device="cpu")
        trainer.fit(2, progress=False)
        runs.append(trainer.losses)
    assert runs[0] == runs[1] != runs[2]


def test_fit_writes_checkpoints_and_sample_grids(tmp_path, dataset, tiny_config):
    config = dataclasses.replace(CONFIG, sample_every=3, checkpoint_every=2, snapshot_every=4)
    trainer = Trainer(tiny_config, DIFFUSION, config, dataset, device="cpu")
    seen = []
    trainer.fit(progress=False, checkpoint_path=tmp_path / "run.pt", on_sample=lambda step, grid: seen.append(step))
    assert [step for step, _ in trainer.samples] == seen == [3, 6]
    assert trainer.samples[0][1].shape == (16, 1, 8, 8)
    state = load_checkpoint(tmp_path / "run.pt")
    assert state["step"] == 6 and len(state["losses"]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "run_step0000004.pt"]
    snapshot = load_checkpoint(tmp_path / "run_step0000004.pt")
    assert snapshot["step"] == 4 and "optimizer" not in snapshot  # EMA weights only
    assert 0 < snapshot["train_seconds"] < state["train_seconds"]
    load_model(tmp_path / "run_step0000004.pt")


def test_ema_follows_its_closed_form(dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, dataclasses.replace(CONFIG, ema_decay=0.9), dataset, device="cpu")
    trainer.fit(1, progress=False)
    weight = lambda m: next(m.parameters()).detach().clone()  # noqa: E731
    assert torch.equal(weight(trainer.ema.module), weight(trainer.model))  # first update copies
    before = weight(trainer.ema.module)
    trainer.fit(2, progress=False)
    decay = min(0.9, (1 + 1) / (10 + 1))  # warm-up: the second update uses decay 2/11
    torch.testing.assert_close(weight(trainer.ema.module), decay * before + (1 - decay) * weight(trainer.model))


def test_bf16_autocast_on_cpu_trains(dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, dataclasses.replace(CONFIG, precision="bf16"), dataset, device="cpu")
    assert trainer.bf16
    trainer.fit(2, progress=False)
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert next(trainer.model.parameters()).dtype == torch.float32  # autocast keeps float32 master weights


@pytest.mark.parametrize("cpuinfo, expected", [("flags : fpu avx512f avx512_bf16 sse", True), ("flags : fpu avx512f sse", False)])
def test_auto_precision_uses_bf16_only_on_cpus_with_bf16_instructions(monkeypatch, dataset, tiny_config, cpuinfo, expected):
    monkeypatch.setattr(devices.Path, "read_text", lambda self: cpuinfo)
    assert Trainer(tiny_config, DIFFUSION, dataclasses.replace(CONFIG, precision="auto"), dataset, device="cpu").bf16 is expected
    assert not Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu").bf16  # CONFIG asks for fp32


def test_epoch_batches_are_permutations_and_resume_anywhere():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    batches = take(EpochBatches(10, 3, seed=0), 6)  # 3 batches per epoch, 1 image dropped
    for epoch in (batches[:3], batches[3:]):
        flat = [i for b in epoch for i in b]
        assert len(flat) == len(set(flat)) == 9
    assert batches[:3] != batches[3:]
    assert take(EpochBatches(10, 3, seed=0, start_step=4), 2) == batches[4:6]
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatches(2, 3, seed=0)


def test_learning_rate_warms_up_then_stays_or_decays_by_a_half_cosine():
    constant = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="constant")
    assert lr_at(0, constant) == pytest.approx(1e-4) and lr_at(9, constant) == lr_at(500, constant) == pytest.approx(1e-3)
    cosine = dataclasses.replace(constant, lr_schedule="cosine")
    assert [lr_at(s, cosine) for s in (0, 9)] == [lr_at(s, constant) for s in (0, 9)]  # the same warm-up
    assert lr_at(10, cosine) == pytest.approx(1e-3)  # 100 decay steps: full, half-way, after the last
    assert lr_at(60, cosine) == pytest.approx(0.5e-3)
    assert lr_at(109, cosine) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_at(110, cosine) == lr_at(200, cosine) == 0.0
    decay = [lr_at(s, cosine) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_min_snr_weighting_changes_the_update_but_logs_the_same_l_simple(dataset, tiny_config):
    runs = {}
    for weighting in ("uniform", "min_snr"):
        config = dataclasses.replace(CONFIG, loss_weighting=weighting, min_snr_gamma=0.1)  # T = 50: most SNRs are below 5
        trainer = Trainer(tiny_config, DIFFUSION, config, dataset, device="cpu")
        trainer.fit(2, progress=False)
        runs[weighting] = trainer
    assert runs["uniform"].losses[0] == runs["min_snr"].losses[0]  # the same batch, t and noise, the same weights before step 1
    uniform, min_snr = (r.model.parameters() for r in runs.values())
    assert any(not torch.equal(a, b) for a, b in zip(uniform, min_snr, strict=True))  # (Adam's first steps are nearly sign(grad))


def test_a_coupled_dataset_trains_on_its_own_noise(dataset, tiny_config):
    # Reflow's coupling: each image comes with its noise (a dataset of (x0, y, noise) triples), not a fresh draw.
    images, labels = dataset.tensors
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(9))
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    g = torch.Generator().manual_seed(0)
    g.set_state(trainer.generator.get_state())
    t = trainer.path.training_times(4, g)  # the times the step will draw
    with torch.no_grad():
        expected = loss_simple(trainer.model, images[:4], trainer.path, t=t, noise=noise[:4]).item()
    assert trainer.train_step(images[:4], labels[:4], noise[:4]) == pytest.approx(expected, rel=1e-6)
    runs = {}
    for name, data in (("independent", dataset), ("coupled", TensorDataset(images, labels, noise))):
        runs[name] = Trainer(tiny_config, DIFFUSION, CONFIG, data, device="cpu")
        runs[name].fit(3, progress=False)
    assert all(a != b for a, b in zip(runs["independent"].losses, runs["coupled"].losses, strict=True))


def test_train_config_validates_choices():
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="min_snr, uniform"):
        TrainConfig(loss_weighting="p2")
    with pytest.raises(ValueError, match="cosine, constant"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="valid names: mnist"):
        TrainConfig(dataset="svhn")


def test_an_ema_only_checkpoint_cannot_be_resumed(tmp_path, dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    trainer.save(tmp_path / "ema.pt", full=False)
    with pytest.raises(ValueError, match="only EMA weights"):
        Trainer.from_checkpoint(tmp_path / "ema.pt", dataset, device="cpu")


def test_loss_by_timestep_bins_l_simple():
    from ddpm_lib.training import loss_by_timestep

    schedule = DIFFUSION.make_schedule()
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1

    class PredictsXt(torch.nn.Module):  # a model whose eps-error shrinks as x_t becomes noise
        def forward(self, x_t, t):
            return x_t

    model = PredictsXt().train()
    t, loss = loss_by_timestep(model, x0, schedule, bins=5, generator=torch.Generator().manual_seed(0))
    assert t.tolist() == [5, 15, 25, 35, 45] and loss.shape == (5,)
    assert (loss[1:] < loss[:-1]).all()  # eps - x_t = sqrt(a) (eps - x0) + ..., smaller as alpha_bar falls
    assert model.training  # the mode is restored


def test_training_time_is_kept_per_machine_across_resumes(tmp_path, monkeypatch, dataset, tiny_config):
    monkeypatch.setattr(training, "device_name", lambda device: "machine A")
    first = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    first.fit(2, progress=False)
    first.fit(3, progress=False)  # a second fit on the same machine adds to its time
    assert first.machine_seconds == {"machine A": pytest.approx(first.train_seconds)}
    first.save(tmp_path / "run.pt")
    monkeypatch.setattr(training, "device_name", lambda device: "machine B")  # resumed elsewhere
    resumed = Trainer.from_checkpoint(tmp_path / "run.pt", dataset, device="cpu")
    resumed.fit(5, progress=False)
    assert resumed.machine_seconds["machine A"] == pytest.approx(first.train_seconds)
    assert 0 < resumed.machine_seconds["machine B"] == pytest.approx(resumed.train_seconds - first.train_seconds)
    resumed.save(tmp_path / "run.pt")
    assert export_ema(tmp_path / "run.pt", tmp_path / "ema.pt")["machine_seconds"] == resumed.machine_seconds


def test_a_decoded_dataset_trains_exactly_like_the_lazy_one(dataset, tiny_config):
    class Lazy(torch.utils.data.Dataset):  # decodes on every access, as torchvision's datasets do
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return dataset[i][0].clone(), 0

    lazy, kept = (Trainer(tiny_config, DIFFUSION, CONFIG, d, device="cpu") for d in (Lazy(), decoded(Lazy())))
    lazy.fit(4, progress=False)
    kept.fit(4, progress=False)
    assert_same_state(lazy, kept)


def test_a_non_finite_loss_stops_the_step_before_the_weights_change(dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    trainer.fit(2, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x0 = dataset.tensors[0][:4].clone()
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="training diverged at step 3: the loss is nan"):
        trainer.train_step(x0)
    assert trainer.step == 2 and len(trainer.losses) == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_diverging_run_leaves_its_last_checkpoint_byte_identical(tmp_path, dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    trainer.fit(2, checkpoint_path=tmp_path / "run.pt", progress=False)
    before = (tmp_path / "run.pt").read_bytes()
    wild = Trainer.from_checkpoint(tmp_path / "run.pt", dataset, device="cpu", lr=1e30, checkpoint_every=0, steps=50)
    with pytest.raises(DivergenceError, match="training diverged at step"):
        wild.fit(progress=False, checkpoint_path=tmp_path / "run.pt")
    assert (tmp_path / "run.pt").read_bytes() == before
    assert wild.saved_step == 2


def test_weights_with_nan_are_never_saved(tmp_path, dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    with torch.no_grad():
        next(trainer.ema.module.parameters()).fill_(float("inf"))
    for full in (True, False):
        with pytest.raises(DivergenceError, match="1 weight tensors hold NaN or inf"):
            trainer.save(tmp_path / "run.pt", full=full)
    assert not (tmp_path / "run.pt").exists()


def press_ctrl_c(*args):
    signal.raise_signal(signal.SIGINT)


@pytest.fixture
def ctrl_c():
    """Ctrl-C as an interactive Python has it (KeyboardInterrupt), whatever this run inherited: a run started in the
    background (``make test &``) begins with SIGINT ignored."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_saves_the_checkpoint_and_the_run_resumes_exactly(tmp_path, dataset, dropout_config, ctrl_c):
    config = dataclasses.replace(CONFIG, sample_every=3)
    straight = Trainer(dropout_config, DIFFUSION, config, dataset, device="cpu")
    straight.fit(progress=False)
    stopped = Trainer(dropout_config, DIFFUSION, config, dataset, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(progress=False, checkpoint_path=tmp_path / "run.pt", on_sample=press_ctrl_c)  # Ctrl-C during step 3
    assert stopped.step == stopped.saved_step == load_checkpoint(tmp_path / "run.pt")["step"] == 3  # finished step 3, then saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before afterwards
    resumed = Trainer.from_checkpoint(tmp_path / "run.pt", dataset, device="cpu")
    resumed.fit(progress=False)
    assert_same_state(straight, resumed)


def test_a_second_ctrl_c_leaves_at_once_and_keeps_the_old_checkpoint(tmp_path, dataset, tiny_config, monkeypatch):
    trainer = Trainer(tiny_config, DIFFUSION, dataclasses.replace(CONFIG, sample_every=2), dataset, device="cpu")
    trainer.fit(1, checkpoint_path=tmp_path / "run.pt", progress=False)
    before = (tmp_path / "run.pt").read_bytes()
    monkeypatch.setattr(training, "save_checkpoint", press_ctrl_c)  # the second Ctrl-C comes while saving
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(checkpoint_path=tmp_path / "run.pt", on_sample=press_ctrl_c, progress=False)
    assert trainer.step == 2 and trainer.saved_step == 1
    assert (tmp_path / "run.pt").read_bytes() == before


def test_deferred_interrupt_counts_the_first_ctrl_c_and_raises_on_the_second(ctrl_c):
    with deferred_interrupt() as interrupted:
        assert not interrupted()
        signal.raise_signal(signal.SIGINT)
        assert interrupted()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # restored
        signal.raise_signal(signal.SIGINT)


def corrupt(state: dict, key: str, value) -> dict:
    if "." in key:
        outer, inner = key.split(".")
        return {**state, outer: {**state[outer], inner: value}}
    return {k: v for k, v in state.items() if k != key} if value is None else {**state, key: value}


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("train_config", "mnist", "TrainConfig is a str, not a dict"),
        ("rng", None, "lacks 'rng'"),
        ("rng.cpu", torch.zeros(3), "does not fit its model"),
        ("step", -4, "step must be a whole number >= 0"),
        ("ema_updates", "many", "does not fit its model"),
        ("model", {}, "Missing key"),
    ],
)
def test_a_training_state_that_loads_but_is_wrong_inside_is_one_clear_error(tmp_path, dataset, tiny_config, key, value, says):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    trainer.fit(1, progress=False)
    state = trainer.state_dict()
    torch.save({"format": "ddpm_lib", "version": 1, **corrupt(state, key, value)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=says):
        Trainer.from_checkpoint(tmp_path / "bad.pt", dataset, device="cpu")


def test_a_wrong_shaped_optimizer_state_is_refused_before_training(tmp_path, dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    trainer.fit(1, progress=False)
    state = trainer.state_dict()
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2, 2)  # AdamW would only fail on its next step
    torch.save({"format": "ddpm_lib", "version": 1, **state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"optimizer state exp_avg has shape \(2, 2\) for a weight of shape"):
        Trainer.from_checkpoint(tmp_path / "bad.pt", dataset, device="cpu")


def test_a_device_this_machine_lacks_is_refused_before_any_work():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="unavailable"):
            Trainer(UNetConfig(), DIFFUSION, CONFIG, TensorDataset(torch.zeros(4, 1, 28, 28)), device="cuda:1")


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("lr", float("nan"), "lr must be a finite number > 0"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
        ("ema_decay", float("nan"), r"ema_decay must be in \[0, 1\)"),
        ("warmup_steps", -1, "warmup_steps must be a whole number >= 0"),
        ("checkpoint_every", -5, "checkpoint_every must be a whole number >= 0"),
        ("steps", 1.5, "steps must be a positive whole number"),
    ],
)
def test_train_config_refuses_out_of_range_values(field, value, says):
    with pytest.raises(ValueError, match=says):
        TrainConfig(**{field: value})


def test_epochs_are_a_positive_whole_number():
    assert epochs_to_steps(2, 20, 4) == 10
    for epochs in (0, -1, 1.5, float("inf")):
        with pytest.raises(ValueError, match="epochs must be a positive whole number"):
            epochs_to_steps(epochs, 20, 4)


@pytest.mark.parametrize("label_dropout, seen", [(0.0, "labels"), (1.0, "null")])
def test_a_dropped_label_trains_the_no_label_class(tiny_config, label_dropout, seen):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(20) % 3
    data = TensorDataset(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, labels)
    config = dataclasses.replace(CONFIG, label_dropout=label_dropout, batch_size=20)
    trainer = Trainer(dataclasses.replace(tiny_config, num_classes=3), DIFFUSION, config, data, device="cpu")
    calls = []
    trainer.model.register_forward_pre_hook(lambda module, args: calls.append(args[2].clone()))
    trainer.fit(1, progress=False)
    (y,) = calls
    assert torch.equal(y, torch.full((20,), 3)) if seen == "null" else sorted(y.tolist()) == sorted(labels.tolist())
    with pytest.raises(ValueError, match="pass y"):
        trainer.train_step(data.tensors[0][:4])


def test_label_dropout_is_a_share(tiny_config):
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\]"):
        TrainConfig(label_dropout=1.5)


def test_init_weights_starts_a_conditional_run_as_the_unconditional_model(dataset, tiny_config):
    source = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    source.fit(2, progress=False)  # trained a little: its zero-initialised layers are no longer zero
    conditional = Trainer(dataclasses.replace(tiny_config, num_classes=3), DIFFUSION, CONFIG, dataset, device="cpu")
    conditional.init_weights(source.ema.module.state_dict())
    x, t = torch.randn(6, 1, 8, 8), torch.tensor([0, 5, 10, 20, 30, 49])
    with torch.no_grad():
        expected = source.ema.module(x, t)
        for y in (torch.zeros(6, dtype=torch.long), torch.full((6,), 2), None):  # every label, and "no label"
            assert torch.allclose(conditional.model(x, t, y), expected, atol=1e-6)
            assert torch.allclose(conditional.ema.module(x, t, y), expected, atol=1e-6)


def test_init_weights_refuses_weights_of_another_shape_and_a_started_run(dataset, tiny_config):
    trainer = Trainer(tiny_config, DIFFUSION, CONFIG, dataset, device="cpu")
    wider = UNet(dataclasses.replace(tiny_config, base_channels=2 * tiny_config.base_channels)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        trainer.init_weights(wider)
    conditional = UNet(dataclasses.replace(tiny_config, num_classes=3)).state_dict()
    with pytest.raises(ValueError, match="unexpected"):  # an unconditional run cannot take a class embedding
        trainer.init_weights(conditional)
    trainer.fit(1, progress=False)
    with pytest.raises(RuntimeError, match="already at step 1"):
        trainer.init_weights(trainer.model.state_dict())


def test_a_single_process_run_is_unchanged_by_distributed_training_support(tiny_config):
    # Losses and EMA weights of this seeded run, recorded before t, the label dropout and eps were
    # drawn per global batch: one process must draw exactly what it drew before.
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (64,), generator=g))
    config = TrainConfig(batch_size=8, steps=5, precision="fp32", sample_every=0, checkpoint_every=0)
    trainer = Trainer(tiny_config, DiffusionConfig(T=50), config, data, "cpu")
    trainer.fit(progress=False)
    assert trainer.losses == pytest.approx([0.973744, 1.084211, 0.937936, 0.955202, 0.986175], abs=2e-6)
    assert float(sum(p.detach().double().sum() for p in trainer.ema.module.parameters())) == pytest.approx(320.2336206275907, rel=1e-6)


@pytest.mark.parametrize("run", ["eps-min_snr-linear", "v-uniform-cosine", "x0-min_snr-linear"])
def test_a_seeded_ddpm_run_trains_exactly_as_before_the_objective_became_data(run):
    # tests/data/ddpm_losses.json: 12 steps of a tiny U-Net on 32 random 8x8 images, recorded before the path, the
    # parametrization and the weighting were tables (and unchanged, bit for bit, on the machine that recorded them)
    prediction, weighting, schedule = run.split("-")
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    config = TrainConfig(dataset="toy", batch_size=8, steps=12, lr=1e-3, warmup_steps=2, loss_weighting=weighting, precision="fp32",
                         sample_every=0, checkpoint_every=0, seed=3)  # fmt: skip
    diffusion = DiffusionConfig(schedule=schedule, T=50, prediction=prediction)
    trainer = Trainer(TINY, diffusion, config, TensorDataset(images, torch.zeros(32)), device="cpu")
    trainer.fit(progress=False)
    recorded = json.loads((Path(__file__).parent / "data" / "ddpm_losses.json").read_text())[run]
    assert trainer.losses == pytest.approx(recorded, rel=1e-5)
