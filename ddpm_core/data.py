"""Training data: MNIST and CIFAR-10 through torchvision, or a folder of your own images,
as tensors scaled to [-1, 1] (Ho et al. 2020, Sec. 3.3).

This module owns finding, checking, downloading and transforming the data; it does not batch
or train. The data root is `--data-root`, else the environment variable DDPM_DATA_ROOT, else
./data.

Bad data gives one line that names the file, what is wrong with it and the fix:
DatasetUnavailableError (a FileNotFoundError) when the data is not there and cannot be
downloaded, DatasetCorruptError (a ValueError) when a file is there but unreadable. MNIST's idx
headers are checked against the file sizes before torchvision reads them; when torchvision
refuses CIFAR-10, each file is checked for presence, torchvision's MD5 and unpickling.

A folder of images (`--dataset folder`) may mix sizes and modes: every image is converted to
the model's channels ("L" for 1, "RGB" for 3; see `ConvertMode`), resized on its short side
and centre-cropped to image_size. One warning says how many images needed that. Files that PIL
cannot open are refused when the dataset is built, files that fail to decode when loaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from ddpm_core.config import DatasetName, check_choice

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# What each built-in dataset's images are: (image_size, channels).
SHAPES = {"mnist": (28, 1), "cifar10": (32, 3)}
MODES = {1: "L", 3: "RGB"}  # the PIL mode a folder image is converted to, by model channels


class DatasetUnavailableError(FileNotFoundError):
    """The data is neither on disk nor downloadable; the message says where to put it."""


class DatasetCorruptError(ValueError):
    """A data file is on disk but unreadable; the one-line message names it, what is wrong and the fix."""


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """`data_root` if given, else $DDPM_DATA_ROOT, else ./data."""
    return Path(data_root or os.environ.get("DDPM_DATA_ROOT") or "data")


def _describe(error: BaseException, last_line: bool = False) -> str:
    """'Type: message' on one line (or only its last line), just 'Type' when the message is empty."""
    text = str(error).strip()
    if last_line and text:
        text = text.splitlines()[-1]
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
                f"{path} is not an image PIL can open ({_describe(error)}); remove it or replace it with a good copy"
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
                f"{path} cannot be decoded ({_describe(error)}); remove it or replace it with a good copy"
            ) from error
        return self.transform(image), 0


def _check_idx_file(path: Path, magic: int, kind: str, fix: str) -> int | None:
    """The item count in the header of an MNIST idx file (None when the file is absent),
    after checking its magic number, image dimensions and size against that header."""
    if not path.is_file():
        return None
    image_dims = 2 if magic == 2051 else 0  # idx3 images: count, rows, columns; idx1 labels: count
    header_size = 8 + 4 * image_dims
    with path.open("rb") as f:
        header = f.read(header_size)
    found = path.stat().st_size

    def corrupt(what: str) -> DatasetCorruptError:
        return DatasetCorruptError(f"MNIST file {path} is corrupt: {what}; {fix}")

    if len(header) < header_size:
        raise corrupt(f"truncated: {found} bytes, shorter than its {header_size}-byte idx header")
    found_magic, count, *dims = struct.unpack(f">{2 + image_dims}I", header)
    if found_magic != magic:
        raise corrupt(f"magic number {found_magic}, expected {magic} for an {kind} file")
    if dims and dims != [28, 28]:
        raise corrupt(f"its header says {dims[0]}x{dims[1]} images, expected 28x28")
    formula = f"{header_size} + {count}x28x28" if dims else f"{header_size} + {count}"
    expected = header_size + count * (784 if dims else 1)
    if found != expected:
        state = "truncated" if found < expected else "longer than its header says"
        raise corrupt(f"{state}: {formula} = {expected} bytes expected, {found} found")
    return count


def _check_mnist_files(root: Path, train: bool) -> None:
    """Refuse, naming the file, an MNIST split whose idx files are there but unreadable; absent
    files are left to torchvision (download, or DatasetUnavailableError)."""
    folder = root / "MNIST"
    if all((folder / "processed" / name).is_file() for name in ("training.pt", "test.pt")):
        return  # torchvision loads its legacy cache, not raw/
    raw = folder / "raw"
    fix = f"delete {raw} and download MNIST again (torchvision does on first use), or copy the four files there again"
    prefix = "train" if train else "t10k"
    images = raw / f"{prefix}-images-idx3-ubyte"
    labels = raw / f"{prefix}-labels-idx1-ubyte"
    md5s = dict(datasets.MNIST.resources)  # of the .gz downloads
    for path in (images, labels):
        gz = raw / f"{path.name}.gz"  # torchvision extracts it (download=True) when the file itself is absent
        if not path.is_file() and gz.is_file() and not check_integrity(gz, md5s[gz.name]):
            raise DatasetCorruptError(f"MNIST file {gz} is corrupt: it fails torchvision's MD5 check (expected "
                                      f"{md5s[gz.name]}: truncated or not the original download); {fix}")
    image_count = _check_idx_file(images, 2051, "idx3 images", fix)
    label_count = _check_idx_file(labels, 2049, "idx1 labels", fix)
    if image_count is not None and label_count is not None and image_count != label_count:
        raise DatasetCorruptError(f"MNIST files {images} and {labels} do not match: {image_count} images but "
                                  f"{label_count} labels; {fix}")


def _check_cifar10_files(root: Path, train: bool) -> None:
    """Why torchvision refused an existing cifar-10-batches-py (a file absent, failing its MD5
    or not unpickling), as a DatasetCorruptError naming the file; nothing if it is not there."""
    cls = datasets.CIFAR10
    folder = root / cls.base_folder
    if not folder.is_dir():
        return
    fix = (f"copy it again from the original archive ({cls.filename}, extracted into {root}), or delete {folder} "
           f"to have torchvision download it again")
    meta = [cls.meta["filename"], cls.meta["md5"]]
    for name, md5 in cls.train_list + cls.test_list + [meta]:
        path = folder / name
        if not path.is_file():
            raise DatasetCorruptError(f"CIFAR-10 file {path} is missing; {fix}")
        if not check_integrity(path, md5):
            raise DatasetCorruptError(f"CIFAR-10 file {path} is corrupt: it fails torchvision's MD5 check "
                                      f"(expected {md5}: truncated or not the original file); {fix}")
    for name, _ in (cls.train_list if train else cls.test_list) + [meta]:
        problem = _cifar10_pickle_problem(folder / name, cls.meta["key"] if name == meta[0] else "data")
        if problem:
            raise DatasetCorruptError(f"CIFAR-10 file {folder / name} is corrupt: {problem}; {fix}")


def _cifar10_pickle_problem(path: Path, key: str) -> str | None:
    """What keeps torchvision from reading a CIFAR-10 pickle (a batch: key "data", the
    meta file: "label_names"), or None."""
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as error:  # UnpicklingError, EOFError, ValueError...
        return f"it cannot be unpickled ({_describe(error)})"
    if not isinstance(entry, dict) or key not in entry:
        return f"it unpickles to a {type(entry).__name__} without {key!r}"
    if key == "data":
        data, labels = np.asarray(entry["data"]), entry.get("labels", entry.get("fine_labels", ()))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            return f"its data has shape {tuple(data.shape)} and {len(labels)} labels, expected (N, 3072) and N labels"
    return None


def _unavailable(name: str, root: Path, error: Exception) -> DatasetUnavailableError:
    """The one-line error for a built-in dataset that is neither on disk nor downloadable."""
    expected = {"mnist": f"{root}/MNIST/raw/ (the four *-ubyte files)",
                "cifar10": f"{root}/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"}[name]
    return DatasetUnavailableError(
        f"{name} is not in {root.resolve()} and could not be downloaded ({_describe(error, last_line=True)}). "
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
    CIFAR-10 gets random horizontal flips by default, as in the paper. "folder" needs
    `image_size` and `channels`. Missing data that cannot be downloaded raises
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
        _check_mnist_files(root, train)  # torchvision would fail on these with a bare AssertionError
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        return cls(root=str(root), train=train, download=download, transform=transform)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError... offline
        if name == "cifar10":
            _check_cifar10_files(root, train)  # a bad file torchvision tried to replace by downloading
        raise _unavailable(name, root, error) from error
