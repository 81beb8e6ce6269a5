import dataclasses

import pytest
import torch

from ddpm_lib.checkpoint import CheckpointError, save_checkpoint
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.noisy_classifier import (
    NoisyClassifier,
    NoisyClassifierConfig,
    accuracy_by_t,
    check_matches,
    load_noisy_classifier,
    save_noisy_classifier,
    train_noisy_classifier,
)

TINY = NoisyClassifierConfig(image_size=8, num_classes=2, base_channels=8, channel_mults=(1, 2), num_groups=4)
DIFFUSION = DiffusionConfig(schedule="linear", T=100)


def two_class_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 lights the top half of an 8x8 image, class 1 the bottom half; (n, 1, 8, 8) in [-1, 1] and (n,)."""
    labels = torch.arange(n) % 2
    x = -torch.ones(n, 1, 8, 8)
    x[labels == 0, :, :4] = 1
    x[labels == 1, :, 4:] = 1
    return x, labels


def test_logits_have_one_column_per_class_and_depend_on_t():
    torch.manual_seed(0)
    model = NoisyClassifier(TINY)
    with torch.no_grad():  # each residual block starts as its skip connection, blind to t; give them weights
        for block in model.blocks:
            block.conv2.weight.normal_(0, 0.1)
    x = torch.randn(5, 1, 8, 8)
    logits = model(x, torch.zeros(5, dtype=torch.long))
    assert logits.shape == (5, 2)
    assert not torch.allclose(logits, model(x, torch.full((5,), 90)))


def test_config_validates_its_fields():
    with pytest.raises(ValueError, match="at least 2 classes"):
        dataclasses.replace(TINY, num_classes=1)
    with pytest.raises(ValueError, match="cannot be halved"):
        dataclasses.replace(TINY, image_size=9)
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        dataclasses.replace(TINY, base_channels=6)


def test_training_reads_the_class_at_low_noise_and_falls_to_chance_at_pure_noise():
    schedule = DIFFUSION.make_schedule()
    x, y = two_class_images(64)
    model = train_noisy_classifier(x, y, schedule, TINY, steps=60, batch_size=32, lr=1e-2, progress=False)
    low, high = accuracy_by_t(model, *two_class_images(400), schedule, [0, schedule.T - 1])
    assert low > 0.95  # x_0 is the clean image: the class is plain to see
    assert abs(high - 0.5) < 0.1  # x_T holds (almost) nothing of x_0: a coin toss


def test_accuracy_by_t_is_the_share_classified_as_their_label():
    class AlwaysZero(torch.nn.Module):
        def forward(self, x, t):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], dim=1)

    labels = torch.tensor([0, 0, 0, 1])
    images = torch.zeros(4, 1, 8, 8)
    assert accuracy_by_t(AlwaysZero(), images, labels, DIFFUSION.make_schedule(), [0, 50, 99]) == [0.75, 0.75, 0.75]


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = NoisyClassifier(TINY)
    save_noisy_classifier(tmp_path / "c.pt", model, DIFFUSION, {0: 0.99, 99: 0.5}, train_images=64)
    loaded, diffusion = load_noisy_classifier(tmp_path / "c.pt")
    assert diffusion == DIFFUSION and loaded.config == TINY and not loaded.training
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 99])
    assert torch.equal(loaded(x, t), model.eval()(x, t))


def test_loading_refuses_a_file_that_is_not_a_noisy_classifier(tmp_path):
    save_checkpoint(tmp_path / "m.pt", {"ema": {}})
    with pytest.raises(CheckpointError, match="is not a noisy classifier"):
        load_noisy_classifier(tmp_path / "m.pt")


def test_a_classifier_fits_only_models_of_its_schedule_and_image_shape():
    model = NoisyClassifier(TINY)
    check_matches(model, DIFFUSION, dataclasses.replace(DIFFUSION, prediction="v"), (1, 8, 8))  # the prediction does not matter
    with pytest.raises(ValueError, match="T=100, the model uses linear with T=50"):
        check_matches(model, DIFFUSION, dataclasses.replace(DIFFUSION, T=50), (1, 8, 8))
    with pytest.raises(ValueError, match="reads"):
        check_matches(model, DIFFUSION, DIFFUSION, (3, 8, 8))
