"""Datasets, all through torchvision, as (B, C, H, W) float images in [-1, 1].

The data root is, in order: the ``root`` argument, the environment variable ``DDPM_DATA``,
``./data``. Standard datasets are downloaded into it when missing (when the network allows).
torchvision is imported where a dataset is opened, not with the library: importing it costs
about 2.5 s on 2 CPU cores, which every command that never reads a dataset (sample, export)
would otherwise pay.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

# name -> (class in torchvision.datasets, channels, native image size)
DATASETS: dict[str, tuple[str | None, int, int | None]] = {
    "mnist": ("MNIST", 1, 28),
    "fashion-mnist": ("FashionMNIST", 1, 28),
    "cifar10": ("CIFAR10", 3, 32),
    "folder": (None, 3, None),  # any folder of images (searched recursively), RGB
}


# name -> number of classes of its labels; a folder of images has none
NUM_CLASSES: dict[str, int] = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}


def num_classes(name: str) -> int:
    """The number of classes a dataset's labels take (0 ... n-1); a clear error for a dataset without labels."""
    dataset_info(name)  # validates the name
    if name not in NUM_CLASSES:
        raise ValueError(f"dataset {name!r} has no class labels; class-conditional training needs one of {', '.join(NUM_CLASSES)}")
    return NUM_CLASSES[name]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing and could not be downloaded."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else $DDPM_DATA, else ./data."""
    return Path(root if root is not None else os.environ.get("DDPM_DATA", "data"))


def dataset_info(name: str) -> tuple[int, int | None]:
    """(channels, native image size or None) of a dataset name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name][1:]


class ImageFiles(Dataset):
    """Every image file under ``folder`` (recursively, sorted) that decodes, labelled 0.

    Each file is decoded once here, before any training step, so that a corrupt or truncated
    image cannot stop a run halfway: files that do not decode are **skipped**, and listed in
    ``skipped`` as (path, reason) for the caller to report. Only regular files are opened (a
    named pipe called x.png would block the read). A folder where no image decodes is a
    :class:`DatasetNotFoundError`.
    """

    def __init__(self, folder: Path, transform: Callable):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in candidates:
            reason = undecodable(path)
            if reason is None:
                self.files.append(path)
            else:
                self.skipped.append((path, reason))
        if candidates and not self.files:
            raise DatasetNotFoundError(
                f"dataset 'folder': none of the {len(candidates)} image files in {folder} decodes ({skipped_summary(self.skipped)})"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` (C, H, W) in [-1, 1] and label 0; :class:`ImageChanged` if the file no longer decodes."""
        from torchvision.datasets.folder import default_loader

        try:
            return self.transform(default_loader(str(self.files[i]))), 0
        except Exception as e:  # changed on disk since it was checked: the same kinds as in undecodable
            raise ImageChanged(f"{self.files[i]} decoded before training but no longer does: {' '.join(str(e).split())}") from e


class ImageChanged(DatasetNotFoundError):
    """An image of a folder dataset that decoded before training no longer does (overwritten, truncated, removed)."""

    @classmethod
    def clean(cls, error: ImageChanged) -> ImageChanged:
        """``error`` with its own one-line message, also when a DataLoader worker raised it (the loader prefixes the
        worker's traceback, whose last line is the original error)."""
        last = str(error).strip().splitlines()[-1]
        return cls(last.split(f"{cls.__name__}: ", 1)[-1])


def undecodable(path: Path) -> str | None:
    """Why the image file ``path`` cannot be used ("not a regular file", PIL's error, ...), or None if it decodes."""
    from torchvision.datasets.folder import default_loader

    if not path.is_file():  # follows links; False for folders, pipes, devices and sockets
        return "not a regular file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image is a bomb here too
            default_loader(str(path))  # decodes every pixel, as training will
    except Exception as e:  # PIL raises many kinds for broken files (OSError, SyntaxError, ValueError, ...)
        return " ".join(str(e).split()) or type(e).__name__
    return None


def skipped_summary(skipped: list[tuple[Path, str]]) -> str:
    """'2 files, e.g. a/bad.png: cannot identify image file' for a log line."""
    path, reason = skipped[0]
    return f"{len(skipped)} file{'s' if len(skipped) > 1 else ''}, e.g. {path.name}: {reason}"


def get_dataset(
    name: str = "mnist",
    root: str | os.PathLike | None = None,
    train: bool = True,
    image_size: int | None = None,
    hflip: bool = False,
    download: bool = True,
    in_memory: bool = False,
) -> Dataset:
    """A dataset of (image, label) pairs, images (C, H, W) in [-1, 1].

    ``name`` is one of :data:`DATASETS`; for ``"folder"``, ``root`` is the folder of images
    itself. Images are resized (shorter side) and center-cropped to ``image_size`` when given
    (required for folders). ``hflip`` adds random horizontal flips (for photos, not digits).
    ``in_memory`` returns the images :func:`decoded` once, for fast batches.
    """
    if in_memory:
        if hflip:
            raise ValueError("in_memory decodes every image once, which would freeze the random flips of hflip; use one or the other")
        return decoded(get_dataset(name, root, train, image_size, hflip, download))
    from torchvision import datasets, transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS

    dataset_info(name)  # validates the name
    class_name, _, native = DATASETS[name]
    size = image_size or native
    if size is None:
        raise ValueError(f"dataset {name!r} needs an image_size")
    steps: list = [transforms.Resize(size), transforms.CenterCrop(size)] if size != native else []
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]  # [0, 1] -> [-1, 1]
    transform = transforms.Compose(steps)
    folder = data_root(root)
    hint = f"looked in {folder.resolve()}; set DDPM_DATA or pass the data root to point at a copy"

    if class_name is None:
        dataset = ImageFiles(folder, transform) if folder.is_dir() else None
        if not dataset:
            raise DatasetNotFoundError(f"dataset 'folder': no image files ({' '.join(IMG_EXTENSIONS)}) found ({hint})")
        return dataset

    cls = getattr(datasets, class_name)
    try:
        return cls(str(folder), train=train, download=False, transform=transform)
    except RuntimeError:
        pass  # files missing: download them if we may
    if not download:
        raise DatasetNotFoundError(f"dataset {name!r} not found ({hint})")
    try:
        return cls(str(folder), train=train, download=True, transform=transform)
    except Exception as e:  # torchvision raises several kinds of network and checksum errors
        reason = " ".join(str(e).split())  # torchvision's message spans lines
        raise DatasetNotFoundError(f"dataset {name!r} is missing and could not be downloaded ({reason}); {hint}") from e


def decoded(dataset: Dataset, batch_size: int = 1024) -> TensorDataset:
    """Every (image, label) of ``dataset`` through its transform once, kept as two tensors.

    A batch then costs an index instead of a decode per image (for MNIST about 9 ms per 128
    digits on 2 CPU cores: 3% of a CPU training step, a larger share of a GPU's shorter one).
    Only for deterministic transforms: random augmentation would be frozen. The whole set is
    held in memory as float32 (MNIST's 60,000 training digits: 188 MB). MNIST, Fashion-MNIST and
    CIFAR-10 at their native size skip the per-image decode: their uint8 array is converted at
    once, with the transform's own arithmetic, so the result is the same to the bit.
    """
    from torchvision import datasets

    if isinstance(dataset, datasets.VisionDataset) and plain(dataset.transform):
        pixels = torch.as_tensor(dataset.data)  # (N, H, W) uint8 for the digits, (N, H, W, C) for CIFAR-10
        pixels = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)  # (N, C, H, W)
        return TensorDataset((pixels.float().div(255) - 0.5) / 0.5, torch.as_tensor(dataset.targets, dtype=torch.long))
    images, labels = zip(*DataLoader(dataset, batch_size=batch_size), strict=True)  # each a tuple of batches
    return TensorDataset(torch.cat(images), torch.cat(labels))


def plain(transform) -> bool:
    """Whether ``transform`` is exactly get_dataset's at native size: ToTensor, then Normalize(0.5, 0.5)."""
    from torchvision import transforms

    steps = getattr(transform, "transforms", [])
    return [type(s) for s in steps] == [transforms.ToTensor, transforms.Normalize] and steps[1].mean == steps[1].std == 0.5
