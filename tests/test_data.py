"""Data loading through torchvision's real code, on small files written in the real formats
(and on the real MNIST in ../shared/data where it exists)."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm_core.data import DatasetUnavailableError, make_dataset, resolve_data_root
from fake_data import write_fake_cifar10, write_fake_mnist

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_mnist_loads_in_minus_one_to_one(tmp_path):
    images = write_fake_mnist(tmp_path)
    data = make_dataset("mnist", tmp_path, download=False)
    x, y = data[3]
    assert len(data) == 20 and x.shape == (1, 28, 28) and y == 3
    torch.testing.assert_close(x[0], torch.from_numpy(images[3]).float() / 255 * 2 - 1)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="the real MNIST is not on this machine")
def test_real_mnist():
    train, test = make_dataset("mnist", SHARED_DATA, download=False), make_dataset("mnist", SHARED_DATA, train=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() == 1 and y == 5


def test_cifar10_passes_torchvisions_checksums_and_flips(tmp_path, fake_cifar_checksums):
    fake_cifar_checksums(write_fake_cifar10(tmp_path))
    data = make_dataset("cifar10", tmp_path, download=False)
    assert len(data) == 30
    x, y = data[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert "RandomHorizontalFlip" in repr(data.transform)
    assert "RandomHorizontalFlip" not in repr(make_dataset("cifar10", tmp_path, download=False, flip=False).transform)


def test_corrupted_cifar10_is_refused_clearly(tmp_path, fake_cifar_checksums):
    fake_cifar_checksums(write_fake_cifar10(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a batch")
    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py"):
        make_dataset("cifar10", tmp_path, download=False)


def test_offline_without_data_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DatasetUnavailableError) as error:
        make_dataset("mnist", tmp_path / "empty", download=True)  # no internet here: the download fails
    message = str(error.value)
    assert str((tmp_path / "empty").resolve()) in message and "MNIST/raw" in message and "DDPM_DATA_ROOT" in message


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
