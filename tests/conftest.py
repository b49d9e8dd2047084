"""Shared fixtures: small configs and schedules that keep the suite fast on a 2-core CPU."""

import pytest
import torch
from torchvision import datasets

from ddpm_core.config import DiffusionConfig, ModelConfig
from ddpm_core.schedule import NoiseSchedule

TINY_UNET = ModelConfig(
    image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
    attention_resolutions=(4,), dropout=0.0,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def linear_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig("linear", 1000))


@pytest.fixture(scope="session")
def cosine_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig("cosine", 1000))


def randomize_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with noise, so zero-initialised layers stop hiding paths."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.fixture
def fake_cifar_checksums(monkeypatch):
    """Point torchvision's CIFAR-10 checksums at our fake files, so its own integrity check runs."""

    def install(md5: dict[str, str]):
        cls = datasets.CIFAR10
        monkeypatch.setattr(cls, "train_list", [[name, md5[name]] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, md5[name]] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})

    return install
