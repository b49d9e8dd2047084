"""Integrity checks for MNIST's and CIFAR-10's files, so that a bad file is named rather than
met as torchvision's bare AssertionError or "Dataset not found or corrupted".

This module owns DatasetCorruptError and the checks: MNIST's idx headers against the file sizes
(before torchvision reads them), and, once torchvision has refused CIFAR-10, each file for
presence, torchvision's MD5 and unpickling. It reads data only to check it; loading is data.py's.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from ddpm_core.messages import describe


class DatasetCorruptError(ValueError):
    """A data file is on disk but unreadable; the one-line message names it, what is wrong and the fix."""


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


def check_mnist_files(root: Path, train: bool) -> None:
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


def check_cifar10_files(root: Path, train: bool) -> None:
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
        return f"it cannot be unpickled ({describe(error)})"
    if not isinstance(entry, dict) or key not in entry:
        return f"it unpickles to a {type(entry).__name__} without {key!r}"
    if key == "data":
        data, labels = np.asarray(entry["data"]), entry.get("labels", entry.get("fine_labels", ()))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            return f"its data has shape {tuple(data.shape)} and {len(labels)} labels, expected (N, 3072) and N labels"
    return None
