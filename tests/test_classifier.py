from pathlib import Path

import pytest
import torch

from ddpm_lib import classifier
from ddpm_lib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm_lib.classifier import (
    FEATURE_DIM,
    MnistClassifier,
    accuracy,
    augment,
    load_classifier,
    mnist_tensors,
    predict,
    save_classifier,
    train_classifier,
)
from ddpm_lib.data import data_root
from ddpm_lib.prediction_cache import SPOT_CHECKS
from ddpm_lib.unet import count_parameters

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "mnist_classifier.pt"
has_mnist = pytest.mark.skipif(not (data_root() / "MNIST" / "raw").is_dir(), reason="no MNIST copy under the data root (set DDPM_DATA)")


def bars(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy two-class set: a bright vertical (class 0) or horizontal (class 1) bar at a random place."""
    g = torch.Generator().manual_seed(seed)
    images, labels = -torch.ones(n, 1, size, size), torch.randint(0, 2, (n,), generator=g)
    for i, (label, pos) in enumerate(zip(labels.tolist(), torch.randint(4, size - 4, (n,), generator=g).tolist(), strict=True)):
        if label == 0:
            images[i, 0, 2:-2, pos - 1 : pos + 2] = 1
        else:
            images[i, 0, pos - 1 : pos + 2, 2:-2] = 1
    return images, labels


def test_shapes_and_size():
    model = MnistClassifier().eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model(x).shape == (3, 10)
    features, probs = predict(model, x)
    assert features.shape == (3, FEATURE_DIM) and (features >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    assert count_parameters(model) * 4 < 2 * 2**20  # float32 weights under 2 MB


def test_large_sets_are_predicted_once_and_read_back_only_for_the_same_weights_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(classifier, "CACHE_MIN_IMAGES", 40)
    model, x = MnistClassifier().eval(), torch.rand(40, 1, 28, 28) * 2 - 1
    first = predict(model, x)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    computed, real = [], classifier._predict
    monkeypatch.setattr(classifier, "_predict", lambda model, images, batch: computed.append(len(images)) or real(model, images, batch))
    assert all(torch.equal(a, b) for a, b in zip(predict(model, x), first, strict=True))
    assert computed == [SPOT_CHECKS]  # read back: only the rows the cache is checked with are computed again
    monkeypatch.undo()
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(classifier, "CACHE_MIN_IMAGES", 40)
    other = MnistClassifier().eval()  # other weights: not the cached result
    assert not torch.allclose(predict(other, x)[1], first[1]) and len(list((tmp_path / "cache").iterdir())) == 2
    x[0, 0, 0, 0] += 0.5  # one pixel changed: computed afresh
    assert not torch.equal(predict(model, x)[0], first[0]) and len(list((tmp_path / "cache").iterdir())) == 3
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "a file" / "cache"))  # a cache that cannot be written costs only the time
    assert torch.equal(predict(model, x)[0], classifier._predict(model, x, 1000)[0])


def test_augment_keeps_the_background_and_roughly_the_ink():
    g = torch.Generator().manual_seed(0)
    images, _ = bars(64, seed=0)
    warped = augment(images, g)
    assert warped.shape == images.shape and warped.min() >= -1 - 1e-6
    assert torch.equal(augment(-torch.ones(4, 1, 28, 28), g), -torch.ones(4, 1, 28, 28))  # blank stays blank
    ink, warped_ink = (images + 1).sum(dim=(1, 2, 3)), (warped + 1).sum(dim=(1, 2, 3))
    assert ((warped_ink / ink - 1).abs() < 0.25).all()  # scale 0.9-1.1 changes the area by at most ~20%
    assert not torch.equal(warped, images)


def test_training_separates_a_toy_task_and_round_trips_through_a_checkpoint(tmp_path):
    x_train, y_train = bars(256, seed=1, size=12)  # the network pools globally, so small images train fast
    x_test, y_test = bars(200, seed=2, size=12)
    model = train_classifier(x_train, y_train, epochs=2, batch_size=32, seed=0, progress=False)
    assert accuracy(model, x_test, y_test) >= 0.95
    save_classifier(tmp_path / "c.pt", model, test_accuracy=1.0, train_images=256)
    loaded = load_classifier(tmp_path / "c.pt")
    torch.testing.assert_close(predict(loaded, x_test)[1], predict(model, x_test)[1])


def test_loading_a_diffusion_checkpoint_as_classifier_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "d.pt", {"ema": {}, "step": 1})
    with pytest.raises(CheckpointError, match="not a classifier; the classifier is checkpoints/mnist_classifier.pt"):
        load_classifier(tmp_path / "d.pt")


def test_shipped_classifier_is_small_and_was_trained_on_the_training_split():
    assert SHIPPED.stat().st_size <= 2 * 2**20
    state = load_checkpoint(SHIPPED)
    assert state["test_accuracy"] >= 0.99 and state["train_images"] >= 23_797


@has_mnist
def test_shipped_classifier_scores_at_least_99_percent_on_the_mnist_test_set():
    images, labels = mnist_tensors(train=False)
    assert len(images) == 10_000 and images.min() == -1 and images.max() == 1
    assert accuracy(load_classifier(SHIPPED), images, labels) >= 0.99
