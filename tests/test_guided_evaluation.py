import dataclasses

import pytest
import torch

from ddpm_lib import guided_evaluation
from ddpm_lib.classifier import MnistClassifier, predict
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.evaluation import Measurement
from ddpm_lib.guidance import class_blocks
from ddpm_lib.guided_evaluation import class_references, guided_floor, guided_sweep, markdown_table, score_guided
from ddpm_lib.metrics import frechet_distance, gaussian_stats
from ddpm_lib.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from ddpm_lib.unet import UNet, UNetConfig

K = 3


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    return MnistClassifier().eval()


@pytest.fixture(scope="module")
def data(judge):
    """60 random 'digits' of K classes, and the references: per class and over all."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(60, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.arange(60) % K
    return images, labels, class_references(judge, images, labels), gaussian_stats(predict(judge, images)[0])


def test_score_guided_is_the_label_accuracy_and_the_mean_class_wise_distance(judge, data):
    images, labels, references, overall = data
    asked = class_blocks(list(range(K)), 30)
    samples = images[:30]
    g = score_guided(judge, samples, asked, references, overall)
    features, probs = predict(judge, samples)
    assert g.label_accuracy == pytest.approx((probs.argmax(1) == asked).double().mean().item())
    expected = sum(frechet_distance(gaussian_stats(features[asked == k]), references[k]) for k in range(K)) / K
    assert g.class_frechet == pytest.approx(expected)
    assert g.quality.n == 30 and sum(g.quality.counts) == 30


def test_the_class_wise_distance_of_a_class_s_own_images_is_zero(judge, data):
    images, labels, references, overall = data
    order = labels.argsort(stable=True)  # the images of class 0, then 1, then 2: exactly the reference sets
    assert score_guided(judge, images[order], labels[order], references, overall).class_frechet == pytest.approx(0, abs=1e-6)


def test_the_floor_takes_real_images_of_each_class_in_equal_shares(judge, data, monkeypatch):
    images, labels, references, overall = data
    seen = {}

    def spy(judge, picked, asked, references, overall):
        seen.update(picked=picked, asked=asked)
        return "scored"

    monkeypatch.setattr(guided_evaluation, "score_guided", spy)
    assert guided_floor(judge, images, labels, references, overall, n=12) == "scored"
    assert seen["asked"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    rows = [int(torch.nonzero((images == p).all(dim=(1, 2, 3)))[0]) for p in seen["picked"]]
    assert len(set(rows)) == 12 and labels[rows].tolist() == seen["asked"].tolist()  # distinct images, each of its asked class


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    config = UNetConfig(image_size=28, base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_groups=4, num_heads=2)
    conditional = UNet(UNetConfig(**{**config.__dict__, "num_classes": K})).eval()
    unconditional = UNet(config).eval()
    classifier = NoisyClassifier(NoisyClassifierConfig(num_classes=K, base_channels=8, channel_mults=(1, 2), num_groups=4)).eval()
    with torch.no_grad():  # fresh U-Nets predict eps = 0 for every label (their heads start at zero): give them weights
        for model in (conditional, unconditional, classifier):
            for p in model.parameters():
                p.normal_(0, 0.1)
    return conditional, unconditional, classifier


def test_sweep_gives_a_row_per_strength_and_reads_its_cache_back(judge, data, tiny_models, tmp_path, monkeypatch):
    _, _, references, overall = data
    conditional, unconditional, classifier = tiny_models
    diffusion = DiffusionConfig(T=10)
    measured = Measurement(n=6, cache=tmp_path / "c.json", model_id="m")
    rows = guided_sweep(conditional, diffusion, judge, references, overall, "cfg", [0, 2], 2, measurement=measured)
    assert [(r.method, r.strength, r.steps) for r in rows] == [("cfg", 0.0, 2), ("cfg", 2.0, 2)]
    assert rows[0].guided != rows[1].guided  # the weight changed the samples
    monkeypatch.setattr(guided_evaluation, "draw", lambda *a, **k: pytest.fail("a cached row was drawn again"))
    assert guided_sweep(conditional, diffusion, judge, references, overall, "cfg", [0, 2], 2, measurement=measured) == rows
    either = dataclasses.replace(measured, bf16=True, any_precision=True)
    assert guided_sweep(conditional, diffusion, judge, references, overall, "cfg", [0, 2], 2, measurement=either) == rows
    table = markdown_table(rows, rows[0].guided)
    assert "| w = 0 |" in table and table.count("| 2 U-Net |") == 1 and table.count("| 4 U-Net |") == 1  # w = 2: 2B images a step
    monkeypatch.undo()
    (row,) = guided_sweep(unconditional, diffusion, judge, references, overall, "classifier", [1.5], 2, classifier, Measurement(n=6))
    assert (row.method, row.strength, row.guided.quality.n) == ("classifier", 1.5, 6)
    assert markdown_table([row], rows[0].guided).endswith("| 2 U-Net + 2 classifier gradients |")


def test_sweep_refuses_an_unknown_method_and_classifier_guidance_without_a_classifier(judge, data, tiny_models):
    _, _, references, overall = data
    _, unconditional, _ = tiny_models
    with pytest.raises(ValueError, match="valid choices: cfg, classifier"):
        guided_sweep(unconditional, DiffusionConfig(T=10), judge, references, overall, "universal", [1])
    with pytest.raises(ValueError, match="needs the noisy classifier"):
        guided_sweep(unconditional, DiffusionConfig(T=10), judge, references, overall, "classifier", [1])
