"""Data loading through torchvision's real code, on small files written in the real formats
(and on the real MNIST in ../shared/data where it exists)."""

import gzip
import hashlib
import logging
import struct
import urllib.request
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets

from ddpm_core.data import (
    DatasetCorruptError, DatasetUnavailableError, TensorImages, make_dataset, resolve_data_root, to_model_range,
)
from fake_data import write_fake_cifar10, write_fake_mnist

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OFFLINE = "no network (forced by the test)"


@pytest.fixture(autouse=True)
def no_internet(monkeypatch) -> list[str]:
    """Every download torchvision tries fails as it does offline, whether or not this machine
    has internet (a test that meant to find its files on disk must not fetch the real ones);
    the URLs it tried."""
    tried = []

    def unreachable(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", str(request)))
        raise URLError(OFFLINE)

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)  # what torchvision's download_url calls
    return tried


def test_mnist_loads_in_minus_one_to_one(tmp_path):
    images = write_fake_mnist(tmp_path)
    data = make_dataset("mnist", tmp_path, download=False)
    x, y = data[3]
    assert len(data) == 20 and x.shape == (1, 28, 28) and y == 3
    torch.testing.assert_close(x[0], torch.from_numpy(images[3]).float() / 255 * 2 - 1)


def test_mnist_in_memory_is_torchvisions_per_item_path_bit_for_bit(tmp_path):
    write_fake_mnist(tmp_path)
    for train in (True, False):
        data = make_dataset("mnist", tmp_path, train=train, download=False)
        per_item = datasets.MNIST(str(tmp_path), train=train, transform=to_model_range(1))
        assert isinstance(data, TensorImages) and len(data) == len(per_item)
        for i in range(len(data)):
            (x, y), (x_ref, y_ref) = data[i], per_item[i]
            assert torch.equal(x, x_ref) and y == y_ref and type(y) is int
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
        sampler = [order[:8], order[8:16]]
        for (x, y), (x_ref, y_ref) in zip(DataLoader(data, batch_sampler=sampler),
                                          DataLoader(per_item, batch_sampler=sampler)):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)  # what __getitems__ hands the loader
    x, _ = data[0]
    x.add_(1.0)  # an edit of an item does not reach the dataset
    assert torch.equal(data[0][0], per_item[0][0])
    assert not isinstance(make_dataset("mnist", tmp_path, download=False, flip=True), TensorImages)  # random flips


def test_tensor_images_refuses_mismatched_labels():
    with pytest.raises(ValueError, match="N labels"):
        TensorImages(torch.zeros(3, 1, 4, 4), torch.zeros(2))


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="the real MNIST is not on this machine")
def test_real_mnist():
    train, test = make_dataset("mnist", SHARED_DATA, download=False), make_dataset("mnist", SHARED_DATA, train=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() == 1 and y == 5
    per_item = datasets.MNIST(str(SHARED_DATA), transform=to_model_range(1))
    for i in torch.randint(len(train), (300,), generator=torch.Generator().manual_seed(0)).tolist():
        assert torch.equal(train[i][0], per_item[i][0]) and train[i][1] == per_item[i][1]


def test_cifar10_passes_torchvisions_checksums_and_flips(tmp_path, fake_cifar_checksums):
    fake_cifar_checksums(write_fake_cifar10(tmp_path))
    data = make_dataset("cifar10", tmp_path, download=False)
    assert len(data) == 30
    x, y = data[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert "RandomHorizontalFlip" in repr(data.transform)
    assert "RandomHorizontalFlip" not in repr(make_dataset("cifar10", tmp_path, download=False, flip=False).transform)


def refused(error_type, *args, **kwargs) -> str:
    """The one-line message of the error that make_dataset(*args, **kwargs) raises."""
    with pytest.raises(error_type) as error:
        make_dataset(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message and "could not be downloaded" not in message
    return message


def test_corrupted_cifar10_names_the_file(tmp_path, fake_cifar_checksums):
    fake_cifar_checksums(write_fake_cifar10(tmp_path))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated: torchvision's MD5 check fails, then its download
    message = refused(DatasetCorruptError, "cifar10", tmp_path, download=False)
    assert f"CIFAR-10 file {batch} is corrupt: it fails torchvision's MD5 check" in message
    assert "copy it again" in message and isinstance(DatasetCorruptError(), ValueError)


def test_cifar10_file_that_passes_its_md5_but_does_not_unpickle(tmp_path, fake_cifar_checksums):
    md5 = write_fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    (folder / "data_batch_2").write_bytes(b"not a batch")
    md5["data_batch_2"] = hashlib.md5(b"not a batch").hexdigest()
    fake_cifar_checksums(md5)
    message = refused(DatasetCorruptError, "cifar10", tmp_path, download=False)
    assert f"{folder / 'test_batch'} is missing" in message
    (folder / "test_batch").write_bytes(b"")
    md5["test_batch"] = hashlib.md5(b"").hexdigest()
    fake_cifar_checksums(md5)
    message = refused(DatasetCorruptError, "cifar10", tmp_path, download=False)
    assert str(folder / "data_batch_2") in message and "cannot be unpickled" in message


def corrupt_mnist(root: Path, split: str = "train", kind: str = "images", data: bytes = b"") -> Path:
    """Fake MNIST in `root` whose `split` `kind` file holds `data` instead; returns its path."""
    write_fake_mnist(root)
    path = root / "MNIST" / "raw" / f"{split}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte"
    path.write_bytes(data)
    return path


def fake_images(n: int, rows: int = 28, cols: int = 28) -> bytes:
    return struct.pack(">IIII", 2051, n, rows, cols) + bytes(n * rows * cols)


@pytest.mark.parametrize("kind, data, what", [
    ("images", struct.pack(">IIII", 1234, 20, 28, 28) + bytes(20 * 784),
     "magic number 1234, expected 2051 for an idx3 images file"),
    ("images", fake_images(20)[:9000], "truncated: 16 + 20x28x28 = 15696 bytes expected, 9000 found"),
    ("images", fake_images(20) + b"extra", "longer than its header says: 16 + 20x28x28 = 15696 bytes expected, 15701"),
    ("images", fake_images(20, 32, 32), "its header says 32x32 images, expected 28x28"),
    ("images", b"\x00\x00\x08", "truncated: 3 bytes, shorter than its 16-byte idx header"),
    ("labels", struct.pack(">II", 2049, 20) + bytes(12), "truncated: 8 + 20 = 28 bytes expected, 20 found"),
    ("labels", struct.pack(">II", 2051, 20) + bytes(20), "magic number 2051, expected 2049 for an idx1 labels file"),
])
def test_corrupt_mnist_names_the_file_and_what_is_wrong(tmp_path, kind, data, what):
    path = corrupt_mnist(tmp_path, kind=kind, data=data)
    message = refused(DatasetCorruptError, "mnist", tmp_path, download=True)  # present: nothing to download
    assert f"MNIST file {path} is corrupt: {what}" in message
    assert f"delete {tmp_path / 'MNIST' / 'raw'} and download MNIST again" in message
    assert len(make_dataset("mnist", tmp_path, train=False, download=False)) == 20  # the other split is fine


def test_mnist_images_and_labels_that_disagree(tmp_path):
    labels = corrupt_mnist(tmp_path, "t10k", "labels", struct.pack(">II", 2049, 19) + bytes(19))
    message = refused(DatasetCorruptError, "mnist", tmp_path, train=False, download=False)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    assert f"{images} and {labels} do not match: 20 images but 19 labels" in message


def test_mnist_truncated_gz_is_named(tmp_path):
    write_fake_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(fake_images(20))[:50])
    message = refused(DatasetCorruptError, "mnist", tmp_path, download=True)
    assert f"{raw / 'train-images-idx3-ubyte.gz'} is corrupt: it fails torchvision's MD5 check" in message


def test_unavailable_message_is_one_line_even_for_a_bare_error(tmp_path, monkeypatch):
    class BareAssert(datasets.MNIST):  # what torchvision's idx reader raises on a bad header
        def __init__(self, *args, **kwargs):
            raise AssertionError()

    monkeypatch.setattr("ddpm_core.data.datasets.MNIST", BareAssert)
    with pytest.raises(DatasetUnavailableError) as error:
        make_dataset("mnist", tmp_path, download=False)
    message = str(error.value)
    assert "(AssertionError)." in message and "AssertionError: )" not in message and "\n" not in message


def test_corrupt_mnist_through_the_command_line(tmp_path, capsys):
    from ddpm_core.cli import main

    path = corrupt_mnist(tmp_path / "data", data=fake_images(20)[:9000])
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--profile", "smoke", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path / "data"),
              "--steps", "1", "--no-progress", "--device", "cpu"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm train: error: ") and str(path) in lines[0]
    assert "truncated" in lines[0] and "Traceback" not in lines[0]


def test_offline_without_data_names_the_folder_and_the_fix(tmp_path, no_internet):
    with pytest.raises(DatasetUnavailableError) as error:
        make_dataset("mnist", tmp_path / "empty", download=True)  # torchvision tries every mirror, and fails
    message = str(error.value)
    assert no_internet and all("mnist" in url.lower() for url in no_internet)
    assert str((tmp_path / "empty").resolve()) in message and "MNIST/raw" in message and "DDPM_DATA_ROOT" in message
    assert f"could not be downloaded (RuntimeError: <urlopen error {OFFLINE}>)" in message and "\n" not in message


def test_image_folder_of_your_own(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a" / "one.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "a" / "b" / "two.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = make_dataset("folder", tmp_path, image_size=16, channels=3)
    assert len(data) == 2
    x, y = data[data.files.index(tmp_path / "a" / "one.png")]
    assert x.shape == (3, 16, 16) and y == 0
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))  # pure red
    grey, _ = make_dataset("folder", tmp_path, image_size=8, channels=1)[data.files.index(tmp_path / "a" / "b" / "two.jpg")]
    assert grey.shape == (1, 8, 8) and abs(grey.mean().item() - (128 / 255 * 2 - 1)) < 0.02
    with pytest.raises(DatasetUnavailableError, match="no images"):
        make_dataset("folder", tmp_path / "a" / "b" / "missing", image_size=8, channels=1)


def test_bad_dataset_requests(tmp_path):
    with pytest.raises(ValueError, match="mnist, cifar10, folder"):
        make_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="28x28 with 1 channel"):
        make_dataset("mnist", tmp_path, image_size=32, channels=3)
    with pytest.raises(ValueError, match="needs image_size and channels"):
        make_dataset("folder", tmp_path)


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPM_DATA_ROOT", raising=False)
    assert resolve_data_root() == Path("data")
    monkeypatch.setenv("DDPM_DATA_ROOT", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root("elsewhere") == Path("elsewhere")


def to_range(value: float) -> float:
    return value / 255 * 2 - 1


def test_mixed_sizes_and_modes_are_converted_with_one_warning(tmp_path, caplog):
    Image.new("RGB", (28, 28), (0, 255, 0)).save(tmp_path / "a_fits.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(tmp_path / "b_rgba.png")  # transparent red: alpha dropped
    Image.new("L", (28, 28), 128).save(tmp_path / "c_grey.png")
    palette = Image.new("P", (20, 36), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 is blue
    palette.save(tmp_path / "d_palette.png")
    Image.fromarray(np.full((28, 28), 128 * 257, np.uint16)).save(tmp_path / "e_16bit.png")  # I;16, mid grey
    Image.new("CMYK", (28, 28), (0, 0, 0, 0)).save(tmp_path / "f_cmyk.jpg")  # no ink: white
    with caplog.at_level(logging.WARNING, logger="ddpm_core.data"):
        data = make_dataset("folder", tmp_path, image_size=28, channels=3)
    records = [r for r in caplog.records if r.name == "ddpm_core.data"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "5 of 6 images" in message and "not 28x28 RGB" in message and "\n" not in message
    assert "b_rgba.png (40x30 RGBA), c_grey.png (28x28 L), d_palette.png (20x36 P)" in message
    assert "a_fits.png" not in message and "e_16bit.png" not in message  # up to three examples
    expected = {"a_fits": [-1, 1, -1], "b_rgba": [1, -1, -1], "c_grey": [to_range(128)] * 3,
                "d_palette": [-1, -1, 1], "e_16bit": [to_range(128)] * 3, "f_cmyk": [1, 1, 1]}
    for path in data.files:
        x, _ = data[data.files.index(path)]
        assert x.shape == (3, 28, 28) and -1 <= x.min() and x.max() <= 1
        torch.testing.assert_close(x[:, 14, 14], torch.tensor(expected[path.stem], dtype=torch.float32), atol=0.02, rtol=0)
    grey = make_dataset("folder", tmp_path, image_size=16, channels=1)
    for path in grey.files:
        x, _ = grey[grey.files.index(path)]
        assert x.shape == (1, 16, 16) and -1 <= x.min() and x.max() <= 1


def test_images_that_fit_need_no_warning(tmp_path, caplog):
    for i in range(3):
        Image.new("L", (8, 8), 10 * i).save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="ddpm_core.data"):
        make_dataset("folder", tmp_path, image_size=8, channels=1)
    assert not [r for r in caplog.records if r.name == "ddpm_core.data"]


def test_folder_refuses_a_file_that_is_not_an_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.jpg").write_text("not an image")
    with pytest.raises(DatasetCorruptError) as error:
        make_dataset("folder", tmp_path, image_size=8, channels=3)
    message = str(error.value)
    assert f"{tmp_path / 'sub' / 'notes.jpg'} is not an image PIL can open" in message
    assert "remove it or replace it" in message and "\n" not in message


def test_folder_names_a_truncated_image_when_it_is_loaded(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    broken = tmp_path / "b.png"
    broken.write_bytes(broken.read_bytes()[:1000])  # the header survives, the pixels do not
    data = make_dataset("folder", tmp_path, image_size=32, channels=3)  # headers only: accepted
    assert data[0][0].shape == (3, 32, 32) and data[2][0].shape == (3, 32, 32)
    with pytest.raises(DatasetCorruptError) as error:
        data[data.files.index(broken)]
    message = str(error.value)
    assert f"{broken} cannot be decoded" in message and "truncated" in message
    assert "remove it or replace it" in message and "\n" not in message
    with pytest.raises(DatasetCorruptError) as error:  # a worker's wrapper: our line is its last
        list(torch.utils.data.DataLoader(data, batch_size=3, num_workers=1))
    assert f"{broken} cannot be decoded" in str(error.value).strip().splitlines()[-1]
