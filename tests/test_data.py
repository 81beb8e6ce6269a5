import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import datasets

from ddpm_lib.data import DatasetNotFoundError, data_root, decoded, get_dataset


def test_data_root_precedence(monkeypatch):
    monkeypatch.delenv("DDPM_DATA", raising=False)
    assert data_root() == Path("data")
    monkeypatch.setenv("DDPM_DATA", "/somewhere")
    assert data_root() == Path("/somewhere")
    assert data_root("explicit") == Path("explicit")


def make_images(folder: Path, n: int = 5) -> None:
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (20 + 3 * i, 30)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")


def test_folder_of_images_is_resized_cropped_and_scaled(tmp_path):
    make_images(tmp_path)
    ds = get_dataset("folder", tmp_path, image_size=16)
    assert len(ds) == 5  # recursive, the .txt skipped
    x, _ = ds[3]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 < 0.5 < x.max()


def test_folder_without_images_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        get_dataset("folder", tmp_path, image_size=16)
    with pytest.raises(ValueError, match="needs an image_size"):
        get_dataset("folder", tmp_path)


def test_images_that_do_not_decode_are_skipped_before_training_and_listed(tmp_path):
    make_images(tmp_path)
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])  # the header decodes, the pixels do not
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait forever for a writer
    ds = get_dataset("folder", tmp_path, image_size=16)
    assert len(ds) == 5 and all(ds[i][0].shape == (3, 16, 16) for i in range(5))  # every kept file loads
    assert sorted(p.name for p, _ in ds.skipped) == ["garbage.jpg", "pipe.png", "truncated.png"]
    reasons = dict((p.name, r) for p, r in ds.skipped)
    assert reasons["pipe.png"] == "not a regular file" and "truncated" in reasons["truncated.png"]


def test_a_folder_where_nothing_decodes_is_one_clear_error(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"not an image at all")
    with pytest.raises(DatasetNotFoundError, match=r"none of the 2 image files in .* decodes \(2 files, e.g. a.png: cannot identify"):
        get_dataset("folder", tmp_path, image_size=16)


def test_missing_dataset_offline_names_dataset_folder_and_env_var(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match=r"'mnist' not found.*looked in .*DDPM_DATA"):
        get_dataset("mnist", tmp_path, download=False)

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error>")

    monkeypatch.setattr(datasets.FashionMNIST, "download", no_network)
    with pytest.raises(DatasetNotFoundError, match=f"'fashion-mnist' is missing and could not be downloaded .*{tmp_path}.*DDPM_DATA") as e:
        get_dataset("fashion-mnist", tmp_path)
    assert "\n" not in str(e.value)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10, folder"):
        get_dataset("imagenet")


@pytest.mark.skipif(not (data_root() / "MNIST" / "raw").is_dir(), reason="no MNIST copy under the data root (set DDPM_DATA)")
def test_mnist_from_the_data_root_is_in_minus_one_to_one():
    train, test = get_dataset("mnist", download=False), get_dataset("mnist", train=False, download=False)
    assert len(test) == 10_000 and len(train) >= 23_797
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() == 1 and 0 <= y <= 9
    assert torch.equal(get_dataset("mnist", download=False, in_memory=True)[0][0], x)  # decoded once, the same digit
    assert os.environ.get("CI") != "true" or len(train) == 23_797  # CI uses the offline copy


@pytest.mark.skipif(not (data_root() / "MNIST" / "raw").is_dir(), reason="no MNIST copy under the data root (set DDPM_DATA)")
def test_native_size_sets_are_converted_at_once_to_exactly_what_the_per_image_decode_gives():
    mnist = get_dataset("mnist", train=False, download=False)
    fast, slow = decoded(mnist), decoded(Subset(mnist, range(300)))  # a Subset takes the per-image path
    assert len(fast) == 10_000 and fast.tensors[1].dtype == torch.long
    assert torch.equal(fast.tensors[0][:300], slow.tensors[0]) and torch.equal(fast.tensors[1][:300], slow.tensors[1])
    cifar = datasets.CIFAR10.__new__(datasets.CIFAR10)  # CIFAR-10's layout, (N, H, W, C) uint8 and a list of labels
    cifar.data = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    cifar.targets, cifar.transform, cifar.target_transform = [3, 1, 4, 1, 5], mnist.transform, None
    fast, slow = decoded(cifar), decoded(Subset(cifar, range(5)))
    assert fast.tensors[0].shape == (5, 3, 32, 32) and torch.equal(fast.tensors[0], slow.tensors[0])
    assert fast.tensors[1].tolist() == [3, 1, 4, 1, 5]


@pytest.mark.skipif(not (data_root() / "FashionMNIST" / "raw").is_dir(), reason="no Fashion-MNIST copy under the data root (set DDPM_DATA)")
def test_fashion_mnist_from_the_data_root_is_complete_and_in_minus_one_to_one():
    train, test = get_dataset("fashion-mnist", download=False), get_dataset("fashion-mnist", train=False, download=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() <= 1 and y == 9  # the first test image: an ankle boot
    assert sorted(torch.bincount(train.targets).tolist()) == [6_000] * 10  # balanced, as published
    memory = get_dataset("fashion-mnist", train=False, download=False, in_memory=True)
    assert torch.equal(memory[0][0], x) and memory[0][1] == y


def test_decoded_folder_holds_the_same_images_and_labels(tmp_path):
    make_images(tmp_path)
    lazy = get_dataset("folder", tmp_path, image_size=16)
    kept = decoded(lazy, batch_size=2)  # batches that do not divide the 5 images
    assert len(kept) == len(lazy) == 5
    for i in range(5):
        assert torch.equal(kept[i][0], lazy[i][0]) and kept[i][1] == lazy[i][1]
    in_memory = get_dataset("folder", tmp_path, image_size=16, in_memory=True)
    assert torch.equal(in_memory.tensors[0], kept.tensors[0])


def test_in_memory_refuses_random_flips(tmp_path):
    make_images(tmp_path)
    with pytest.raises(ValueError, match="freeze the random flips"):
        get_dataset("folder", tmp_path, image_size=16, hflip=True, in_memory=True)
