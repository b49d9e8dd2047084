"""Training data: MNIST and CIFAR-10 through torchvision, or a folder of your own images,
as tensors scaled to [-1, 1] (Ho et al. 2020, Sec. 3.3).

This module owns finding, downloading and transforming the data; it does not batch or train,
and the checks of MNIST's and CIFAR-10's files are data_integrity.py's. The data root is
`--data-root`, else the environment variable DDPM_DATA_ROOT, else ./data.

Bad data gives one line that names the file, what is wrong with it and the fix:
DatasetUnavailableError (a FileNotFoundError) when the data is not there and cannot be
downloaded, DatasetCorruptError (a ValueError, importable from here) when a file is there but
unreadable.

A folder of images (`--dataset folder`) may mix sizes and modes: every image is converted to
the model's channels ("L" for 1, "RGB" for 3; see `ConvertMode`), resized on its short side
and centre-cropped to image_size. One warning says how many images needed that. Files that PIL
cannot open are refused when the dataset is built, files that fail to decode when loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ddpm_core.config import DatasetName, check_choice
from ddpm_core.data_integrity import DatasetCorruptError, check_cifar10_files, check_mnist_files
from ddpm_core.messages import describe

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# What each built-in dataset's images are: (image_size, channels).
SHAPES = {"mnist": (28, 1), "cifar10": (32, 3)}
MODES = {1: "L", 3: "RGB"}  # the PIL mode a folder image is converted to, by model channels


class DatasetUnavailableError(FileNotFoundError):
    """The data is neither on disk nor downloadable; the message says where to put it."""


def resolve_data_root(data_root: str | Path | None = None, default: str | Path = "data") -> Path:
    """`data_root` if given, else $DDPM_DATA_ROOT, else `default` (./data; the notebooks, which
    run in notebooks/, pass ../data)."""
    return Path(data_root or os.environ.get("DDPM_DATA_ROOT") or default)


class ConvertMode:
    """PIL image -> `mode` ("L" or "RGB"): a transform step (a class, so DataLoader workers can
    pickle it). The policy for images of any other mode:

    - 16-bit greyscale ("I;16", "I;16B", ...) is scaled to 8 bits (v >> 8) first, because
      PIL's own conversion clips it at 255 (a white image);
    - everything else goes through PIL's `Image.convert`, as PIL documents it: palette images
      through their palette, alpha dropped (not composited: a transparent pixel keeps the colour
      stored under it), colour -> "L" by the ITU-R 601-2 luma transform, CMYK and YCbCr by PIL's
      formulas, 32-bit "I" and float "F" clipped to 0..255.
    """

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode.startswith("I;16"):
            image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))  # mode "L"
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def to_model_range(channels: int, image_size: int | None = None, flip: bool = False) -> transforms.Compose:
    """PIL image -> (C, H, W) float tensor in [-1, 1]: convert to "L" or "RGB", resize the short
    side and centre-crop (with `image_size`), optional flip, then x * 2 - 1."""
    steps: list = [ConvertMode(MODES[channels])]  # first: PIL resizes palette images without interpolation
    if image_size is not None:
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [
        transforms.ToTensor(),  # [0, 1]
        transforms.Normalize([0.5] * channels, [0.5] * channels),  # [-1, 1]
    ]
    return transforms.Compose(steps)


def _read_headers(files: list[Path], image_size: int, mode: str) -> list[tuple[Path, tuple[int, int], str]]:
    """(path, (width, height), mode) of each file that is not already image_size x image_size in
    `mode`, from the headers only (nothing is decoded); a file PIL cannot open is refused."""
    odd = []
    for path in files:
        try:
            with Image.open(path) as image:  # lazy: reads the header, decodes no pixels
                size, image_mode = image.size, image.mode
        except Exception as error:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error...
            raise DatasetCorruptError(
                f"{path} is not an image PIL can open ({describe(error)}); remove it or replace it with a good copy"
            ) from error
        if size != (image_size, image_size) or image_mode != mode:
            odd.append((path, size, image_mode))
    return odd


class ImageFolderDataset(Dataset):
    """Every image file below `root` (searched recursively), with `channels` channels and
    image_size x image_size pixels; the label is always 0.

    Images of other modes or sizes are converted, deliberately: to "L" (1 channel) or "RGB"
    (3 channels) as `ConvertMode` documents (palette, alpha, 16-bit, CMYK...), then resized on
    the short side to `image_size` and centre-cropped. Building the dataset opens each file's
    header (cheap, no decoding): a file PIL cannot identify raises DatasetCorruptError naming
    it, and one warning counts the images that will be converted, naming up to three. A file
    that fails to decode when loaded (e.g. truncated) raises DatasetCorruptError naming it.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int, flip: bool = False):
        if channels not in MODES:
            raise ValueError(f"the folder dataset makes 1-channel (L) or 3-channel (RGB) images, not {channels} "
                             f"channels; use a model config with in_channels 1 or 3")
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DatasetUnavailableError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}; "
                f"point --data-root at a folder that holds your images"
            )
        mode = MODES[channels]
        odd = _read_headers(self.files, image_size, mode)
        if odd:
            examples = ", ".join(f"{p.relative_to(self.root)} ({w}x{h} {m})" for p, (w, h), m in odd[:3])
            log.warning("%d of %d images under %s are not %dx%d %s (e.g. %s); they are converted to %s, resized on "
                        "the short side and centre-cropped, as ImageFolderDataset documents",
                        len(odd), len(self.files), self.root, image_size, image_size, mode, examples, mode)
        self.convert = ConvertMode(mode)
        self.transform = to_model_range(channels, image_size, flip)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()  # decode here, so that a bad file is named
                image = self.convert(image)
        except Exception as error:  # "image file is truncated", "broken PNG file", unsupported conversions...
            raise DatasetCorruptError(
                f"{path} cannot be decoded ({describe(error)}); remove it or replace it with a good copy"
            ) from error
        return self.transform(image), 0


class TensorImages(Dataset):
    """Images already in [-1, 1], one (N, C, H, W) float tensor, with their labels (N,): what
    `make_dataset` gives for MNIST (no random transform to draw per image).

    Items are (image, int label), as torchvision's; `__getitems__` (which DataLoader calls
    with a batch's indices) gathers the batch in one indexing. torchvision's MNIST builds a
    PIL image per item instead: ~25 ms per batch of 64 on the 2-core laptop machine, 4% of a
    `laptop` training step (README: how the laptop profile was tuned).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"TensorImages takes images (N, C, H, W) and N labels, got {tuple(images.shape)} "
                             f"and {len(labels)}")
        self.images, self.labels = images, labels

    @classmethod
    def from_mnist(cls, data: datasets.MNIST) -> TensorImages:
        """torchvision's uint8 MNIST through the same float32 operations as `to_model_range`
        (x / 255, then (x - 0.5) / 0.5), so every pixel is bit-identical to the per-item path."""
        images = data.data.unsqueeze(1).to(torch.float32).div(255).sub(0.5).div(0.5)
        return cls(images, data.targets.long())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), int(self.labels[index])  # a copy, as torchvision's: edits stay out

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.images[rows].unbind(0), self.labels[rows].tolist()))  # indexing copies


def _unavailable(name: str, root: Path, error: Exception) -> DatasetUnavailableError:
    """The one-line error for a built-in dataset that is neither on disk nor downloadable."""
    expected = {"mnist": f"{root}/MNIST/raw/ (the four *-ubyte files)",
                "cifar10": f"{root}/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"}[name]
    return DatasetUnavailableError(
        f"{name} is not in {root.resolve()} and could not be downloaded ({describe(error, last_line=True)}). "
        f"Download it on a machine with internet (torchvision does this on first use), then copy it to "
        f"{expected}, or point --data-root / DDPM_DATA_ROOT at the folder that holds it."
    )


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
    CIFAR-10 gets random horizontal flips by default, as in the paper; MNIST (unflipped) is
    held as one tensor (`TensorImages`), the same pixels without a PIL image per item.
    "folder" needs `image_size` and `channels`. Missing data that cannot be downloaded raises
    DatasetUnavailableError naming the folder searched and how to provide the files; a file
    that is there but unreadable raises DatasetCorruptError naming it and the fix.
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
    if name == "mnist":
        check_mnist_files(root, train)  # torchvision would fail on these with a bare AssertionError
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        data = cls(root=str(root), train=train, download=download, transform=transform)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError... offline
        if name == "cifar10":
            check_cifar10_files(root, train)  # a bad file torchvision tried to replace by downloading
        raise _unavailable(name, root, error) from error
    return TensorImages.from_mnist(data) if name == "mnist" and not flip else data
