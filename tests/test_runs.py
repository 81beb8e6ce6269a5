import pytest
import torch

from ddpm_lib.checkpoint import load_checkpoint, save_checkpoint
from ddpm_lib.runs import RESUMABLE, RunError, flag, new_run, resumed_run
from ddpm_lib.training import max_workers

CPU = torch.device("cpu")
TINY = {"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1, "T": 20, "batch_size": 4, "sample_every": 0}


def folder_run(images, **options):
    return {"dataset": "folder", "data_root": str(images), "image_size": 8, **TINY, **options}


@pytest.fixture(scope="module")
def saved(images, tmp_path_factory):
    """A run of 2 steps saved to disk, as train --out writes it."""
    out = tmp_path_factory.mktemp("run") / "run.pt"
    trainer = new_run(folder_run(images, steps=2), CPU)
    trainer.fit(2, checkpoint_path=out)
    return out


def test_a_new_run_takes_the_options_and_the_defaults_for_the_rest(images):
    trainer = new_run(folder_run(images, steps=3, lr=5e-4, prediction="v"), CPU)
    model, diffusion, train = trainer.model.config, trainer.diffusion_config, trainer.config
    assert (model.in_channels, model.image_size, model.base_channels, model.num_classes) == (3, 8, 8, 0)
    assert model.attention_resolutions == (4,)  # by default at the lowest resolution: 8 pixels halved once
    assert (diffusion.T, diffusion.prediction, diffusion.schedule) == (20, "v", "linear")  # the course's default schedule
    assert (train.steps, train.lr, train.dataset, train.hflip) == (3, 5e-4, "folder", True)  # photos may be mirrored
    assert new_run(folder_run(images, epochs=2), CPU).config.steps == 6  # 12 images in batches of 4, twice
    assert new_run(folder_run(images, attention_resolutions=()), CPU).model.config.attention_resolutions == ()


@pytest.mark.parametrize(
    "options, says",
    [
        ({"image_size": None}, "--dataset folder needs --image-size"),
        ({"label_dropout": 0.1}, "--label-dropout needs --conditional"),
        ({"conditional": True}, "has no class labels"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_options_that_cannot_make_a_run_are_refused_before_the_data_is_read(images, options, says):
    with pytest.raises(ValueError, match=says):
        new_run({**folder_run(images), **options, "data_root": str(images / "missing")}, CPU)  # no data: the check came first


def test_init_takes_the_source_shape_and_weights_and_refuses_shape_options(images, saved):
    shape_flags = "--base-channels, --channel-mults, --num-res-blocks, --T"
    with pytest.raises(RunError, match=f"--init takes the U-Net and diffusion settings from .*; drop {shape_flags}"):
        new_run(folder_run(images, init=str(saved)), CPU)
    trainer = new_run({"dataset": "folder", "data_root": str(images), "image_size": 8, "init": str(saved), "steps": 1}, CPU)
    source = load_checkpoint(saved)
    assert trainer.diffusion_config.T == 20 and trainer.config.init == str(saved)
    for name, weight in source["ema"].items():
        assert torch.equal(trainer.model.state_dict()[name], weight), name
    with pytest.raises(RunError, match=r"is a model of 3 x 8 x 8 images, not 3 x 12 x 12 \(folder\)"):
        new_run({"dataset": "folder", "data_root": str(images), "image_size": 12, "init": str(saved)}, CPU)


def test_a_resumed_run_changes_only_what_it_may(images, saved):
    same = {"steps": 5, "lr": 1e-3, "precision": "fp32", "batch_size": 4, "data_root": str(images)}  # batch_size as saved: fine
    trainer = resumed_run(saved, same, CPU)
    assert (trainer.step, trainer.config.steps, trainer.config.lr, trainer.config.precision) == (2, 5, 1e-3, "fp32")
    with pytest.raises(RunError, match=r"--resume cannot change --batch-size \(saved: 4\), --channel-mults \(saved: 1,2\)"):
        resumed_run(saved, {"steps": 5, "batch_size": 2, "channel_mults": (1, 2, 2)}, CPU)
    with pytest.raises(RunError, match="--steps 2 is not above the step .* has reached \\(2\\)"):
        resumed_run(saved, {"steps": 2}, CPU)
    with pytest.raises(RunError, match=r"is complete \(2 of 2 steps\)"):
        resumed_run(saved, {"data_root": str(images)}, CPU)
    with pytest.raises(RunError, match="--init starts a new run"):
        resumed_run(saved, {"init": str(saved), "steps": 5}, CPU)
    with pytest.raises(RunError, match="does not exist"):
        resumed_run(saved.with_name("none.pt"), {"steps": 5}, CPU)


def test_every_resumable_option_is_a_training_setting_with_a_flag():
    assert flag("label_dropout") == "--label-dropout"
    from ddpm_lib.training import TrainConfig

    assert set(RESUMABLE) <= {f for f in TrainConfig.__dataclass_fields__}


def test_a_saved_fork_storm_is_refused_in_one_line_and_can_be_overridden(images, saved, tmp_path):
    """The probe's case: a checkpoint whose train_config says num_workers = 10^9 forked DataLoader workers until the OS refused."""
    state = load_checkpoint(saved)
    state["train_config"]["num_workers"] = 10**9
    save_checkpoint(tmp_path / "storm.pt", state)
    with pytest.raises(RunError, match=f"saved with --num-workers 1,000,000,000, more than the {max_workers()} cores here"):
        resumed_run(tmp_path / "storm.pt", {"steps": 3, "data_root": str(images)}, CPU)
    trainer = resumed_run(tmp_path / "storm.pt", {"steps": 3, "data_root": str(images), "num_workers": 0}, CPU)
    assert trainer.config.num_workers == 0 and trainer.step == 2
    with pytest.raises(ValueError, match=f"num_workers must be at most {max_workers()}"):
        new_run(folder_run(images, num_workers=max_workers() + 1), CPU)
