"""Training data: MNIST and CIFAR-10 through torchvision, or a folder of your own images,
as tensors scaled to [-1, 1] (Ho et al. 2020, Sec. 3.3).

This module owns finding, downloading and transforming the data; it does not batch or train.
The data root is `--data-root`, else the environment variable DDPM_DATA_ROOT, else ./data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ddpm_core.config import check_choice

DatasetName = Literal["mnist", "cifar10", "folder"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# What each built-in dataset's images are: (image_size, channels).
SHAPES = {"mnist": (28, 1), "cifar10": (32, 3)}


class DatasetUnavailableError(FileNotFoundError):
    """The data is neither on disk nor downloadable; the message says where to put it."""


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """`data_root` if given, else $DDPM_DATA_ROOT, else ./data."""
    return Path(data_root or os.environ.get("DDPM_DATA_ROOT") or "data")


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")  # a named function, so DataLoader workers can pickle it


def to_model_range(channels: int, image_size: int | None = None, flip: bool = False) -> transforms.Compose:
    """PIL image -> (C, H, W) float tensor in [-1, 1]: optional flip, resize, then x * 2 - 1."""
    steps: list = []
    if image_size is not None:
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [
        transforms.Grayscale(1) if channels == 1 else transforms.Lambda(_to_rgb),
        transforms.ToTensor(),  # [0, 1]
        transforms.Normalize([0.5] * channels, [0.5] * channels),  # [-1, 1]
    ]
    return transforms.Compose(steps)


class ImageFolderDataset(Dataset):
    """Every image file below `root` (searched recursively), resized and centre-cropped to
    `image_size`, with `channels` channels; the label is always 0."""

    def __init__(self, root: str | Path, image_size: int, channels: int, flip: bool = False):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetUnavailableError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}; "
                f"point --data-root at a folder that holds your images"
            )
        self.transform = to_model_range(channels, image_size, flip)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            return self.transform(image), 0


def make_dataset(
    name: DatasetName,
    data_root: str | Path | None = None,
    train: bool = True,
    download: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
    flip: bool | None = None,
) -> Dataset:
    """The named dataset, yielding (image in [-1, 1] of shape (C, H, W), label).

    MNIST and CIFAR-10 come through torchvision (downloaded into the data root when missing);
    CIFAR-10 gets random horizontal flips by default, as in the paper. "folder" needs
    `image_size` and `channels`. Missing data that cannot be downloaded raises
    DatasetUnavailableError naming the folder searched and how to provide the files.
    """
    check_choice(name, DatasetName, "dataset")
    root = resolve_data_root(data_root)
    if name == "folder":
        if image_size is None or channels is None:
            raise ValueError("the folder dataset needs image_size and channels (from the model config)")
        return ImageFolderDataset(root, image_size, channels, flip=bool(flip))
    size, native_channels = SHAPES[name]
    if (image_size, channels) not in ((None, None), (size, native_channels)):
        raise ValueError(f"{name} images are {size}x{size} with {native_channels} channel(s), not "
                         f"{image_size}x{image_size} with {channels}; use a model config that matches")
    transform = to_model_range(native_channels, flip=(name == "cifar10") if flip is None else flip)
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        return cls(root=str(root), train=train, download=download, transform=transform)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError... offline
        expected = {"mnist": f"{root}/MNIST/raw/ (the four *-ubyte files)",
                    "cifar10": f"{root}/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"}[name]
        raise DatasetUnavailableError(
            f"{name} is not in {root.resolve()} and could not be downloaded "
            f"({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}). "
            f"Download it on a machine with internet (torchvision does this on first use), then copy it to "
            f"{expected}, or point --data-root / DDPM_DATA_ROOT at the folder that holds it."
        ) from error
