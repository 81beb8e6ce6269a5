import dataclasses
from pathlib import Path

import pytest
import torch

from ddpm_lib import generate
from ddpm_lib.checkpoint import load_checkpoint, save_checkpoint
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.generate import SampleRequest, prepare
from ddpm_lib.guidance import DEFAULT_CLASSIFIER_SCALE, DEFAULT_GUIDANCE, class_blocks
from ddpm_lib.noisy_classifier import NoisyClassifier, NoisyClassifierConfig, save_noisy_classifier
from ddpm_lib.solvers import DDIM, DDPM, DPMSolverPP2M, DPMSolverPP3M, DPMSolverPP3MPublished
from ddpm_lib.unet import UNet, UNetConfig

DIFFUSION = {"schedule": "linear", "T": 12, "prediction": "eps"}
ROOT = Path(__file__).parent.parent
# The shipped checkpoints record no path (they predate it): drawn before the path object (issue 40) into
# tests/data/path_reference.pt, two images each from seeds 300, 301, ... in this order, in fp32 on the CPU.
SHIPPED = {
    "ddpm_ddim_5": {"checkpoint": "mnist_ddpm.pt", "solver": DDIM(5)},
    "ddpm_ddim_5_eta1": {"checkpoint": "mnist_ddpm.pt", "solver": DDIM(5, eta=1.0)},
    "ddpm_dpmpp3m_5": {"checkpoint": "mnist_ddpm.pt", "solver": DPMSolverPP3M(5)},
    "cfg_dpmpp2m_5": {"checkpoint": "mnist_cfg.pt", "solver": DPMSolverPP2M(5), "label": [3, 7]},
    "cfg_ddim_5_w0": {"checkpoint": "mnist_cfg.pt", "solver": DDIM(5), "label": [1], "guidance": 0.0},
    "classifier_dpmpp3m_5": {
        "checkpoint": "mnist_ddpm.pt",
        "solver": DPMSolverPP3MPublished(5),
        "label": [4, 9],
        "classifier": str(ROOT / "checkpoints" / "mnist_noisy_classifier.pt"),
    },
}


def save_model(path, num_classes: int):
    torch.manual_seed(0)
    config = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_groups=4, num_heads=2)
    model = UNet(dataclasses.replace(config, num_classes=num_classes))
    with torch.no_grad():  # zero-initialised output layers predict a constant, which prepare refuses
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    save_checkpoint(path, {"model_config": dataclasses.asdict(model.config), "diffusion_config": DIFFUSION, "ema": model.state_dict()})
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    classifier = NoisyClassifier(NoisyClassifierConfig(image_size=8, num_classes=3, base_channels=8, channel_mults=(1, 2), num_groups=4))
    save_noisy_classifier(folder / "c.pt", classifier, DiffusionConfig(**DIFFUSION), {0: 1.0}, train_images=0)
    return {"cfg": save_model(folder / "cfg.pt", 3), "uncond": save_model(folder / "u.pt", 0), "classifier": str(folder / "c.pt")}


def test_a_plain_request_takes_the_defaults(models):
    plan = prepare(SampleRequest(models["uncond"], num=3))
    assert plan.solver == DDPM() and plan.chw == (1, 8, 8) and plan.num_steps == 12 + 1
    assert plan.classes is None and plan.guide == {} and plan.labels(0, 3) is None
    assert plan.denoiser.path.schedule.T == 12 and plan.denoiser.batch_size == generate.BATCH


def test_images_are_the_trajectorys_end_and_reproducible(models):
    request = SampleRequest(models["cfg"], num=5, solver=DDIM(4), seed=3, label=[2, 0])
    plan = prepare(request)
    assert plan.solver == DDIM(4) and plan.num_steps == 5 and plan.guide == {"guidance": DEFAULT_GUIDANCE}
    assert plan.labels(0, 5).tolist() == [2, 2, 2, 0, 0]
    images = plan.images()
    assert images.shape == (5, 1, 8, 8) and images.abs().max() <= 1
    steps = list(plan.trajectory())
    assert [s.t for s in steps] == [11, 8, 5, 2, -1] and torch.equal(steps[-1].x_t, images)
    assert torch.equal(prepare(request).images(), images)
    assert not torch.equal(prepare(dataclasses.replace(request, seed=4)).images(), images)


def test_batches_carry_their_own_labels(models, monkeypatch):
    monkeypatch.setattr(generate, "BATCH", 4)
    seen = []
    real = generate.guided
    monkeypatch.setattr(generate, "guided", lambda den, labels=None, **guide: seen.append(labels.tolist()) or real(den, labels, **guide))
    prepare(SampleRequest(models["cfg"], num=6, solver=DDIM(2), label="all")).images()
    assert seen == [[0, 0, 1, 1], [2, 2]] == [class_blocks([0, 1, 2], 6)[i : i + 4].tolist() for i in (0, 4)]


def test_a_classifier_guides_an_unconditional_model_with_its_default_scale(models):
    plan = prepare(SampleRequest(models["uncond"], num=3, solver=DDIM(3), label=[1], classifier=models["classifier"]))
    assert plan.classes == [1] and plan.guide["classifier_scale"] == DEFAULT_CLASSIFIER_SCALE and "guidance" not in plan.guide
    plain = prepare(SampleRequest(models["uncond"], num=3, solver=DDIM(3)))
    assert not torch.equal(plan.images(), plain.images())  # the same noise, steered


def test_nothing_grows_with_num_before_drawing(models):
    plan = prepare(SampleRequest(models["cfg"], num=10**30, solver=DDIM(2), label="all"))  # checkable before any drawing
    assert plan.chw == (1, 8, 8) and plan.labels(10**30 - 2, 2).tolist() == [2, 2]


@pytest.mark.parametrize(
    "model, fields, says",
    [
        ("uncond", {"classifier_scale": 2.0}, "--classifier-scale needs --classifier"),
        ("uncond", {"guidance": 1.0, "label": [0]}, "is an unconditional model; guide it with --classifier"),
        ("uncond", {"label": [0]}, "add --classifier to guide it toward a class"),
        ("cfg", {"guidance": 1.0}, "--guidance needs --label"),
        ("cfg", {"label": [3]}, r"--label 3 is out of range: this model knows classes 0 \.\.\. 2"),
        ("cfg", {"label": "all", "num": 2}, "--num 2 is fewer images than the 3 classes"),
        ("cfg", {"solver": DDPM(steps=5)}, "DDPM visits all T=12 steps"),
        ("cfg", {"solver": DDIM(13)}, "between 1 and T=12"),
    ],
)
def test_choices_that_cannot_work_are_refused_with_the_flag_to_change(models, model, fields, says):
    with pytest.raises(ValueError, match=says):
        prepare(SampleRequest(models[model], **{"num": 4, **fields}))


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_checkpoints_draw_what_they_drew_before_the_path_object(name):
    options = {**SHIPPED[name], "checkpoint": str(ROOT / "checkpoints" / SHIPPED[name]["checkpoint"])}
    seed = 300 + list(SHIPPED).index(name)
    images = prepare(SampleRequest(num=2, seed=seed, device="cpu", precision="fp32", **options)).images()
    expected = torch.load(Path(__file__).parent / "data" / "path_reference.pt", weights_only=True)["shipped"][name]
    assert torch.allclose(images, expected, atol=1e-5), (images - expected).abs().max()  # bit for bit on the machine that drew them


def test_a_checkpoint_that_records_no_path_samples_bit_for_bit_as_the_vp_path(models, tmp_path):
    state = load_checkpoint(models["cfg"])
    assert "path" not in state["diffusion_config"]  # as every checkpoint saved before paths were recorded
    save_checkpoint(tmp_path / "vp.pt", {**state, "diffusion_config": {**state["diffusion_config"], "path": "vp"}})
    for solver in (DDPM(), DDIM(5, eta=0.5), DPMSolverPP3M(6)):
        old, new = (
            prepare(SampleRequest(str(c), num=4, solver=solver, seed=9, label=[1])).images() for c in (models["cfg"], tmp_path / "vp.pt")
        )
        assert torch.equal(old, new)
