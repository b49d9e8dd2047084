"""Small datasets in the real file formats, so that torchvision's own loading code runs in
the tests and in `make test`'s notebook check (no download, no real data needed).

`python tests/fake_data.py DIR` writes a fake MNIST into DIR/MNIST/raw.
"""

import hashlib
import pickle
import struct
import sys
from pathlib import Path

import numpy as np


def write_fake_mnist(root: Path, n: int = 20) -> np.ndarray:
    """The four MNIST idx files (uncompressed), as torchvision reads them from root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return images


def write_fake_cifar10(root: Path, n: int = 6) -> dict[str, str]:
    """cifar-10-batches-py in the real pickle format; returns each file's md5."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    md5 = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    for path in folder.iterdir():
        md5[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5


if __name__ == "__main__":
    write_fake_mnist(Path(sys.argv[1]), n=64)
