"""Shared fixtures: small configs and schedules that keep the suite fast on a 2-core CPU, the
command line run in-process, and the process state that no test may leak into the next."""

import logging
import os

import pytest
import torch
from torchvision import datasets

from ddpm_core.config import DiffusionConfig, ModelConfig
from ddpm_core.runtime import THREADS_ENV, configure_threads
from ddpm_core.schedule import NoiseSchedule

TINY_UNET = ModelConfig(
    image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
    attention_resolutions=(4,), dropout=0.0, norm_groups=8,
)


@pytest.fixture(scope="session", autouse=True)
def _threads_for_the_load():
    """The suite takes the CPU threads the command line takes (`configure_threads`: $DDPM_THREADS,
    else one per core that other programs leave free): beside other busy programs on 2 cores,
    torch's default of one thread per core runs the same test up to 10 times slower."""
    configure_threads()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_process_state():
    """Whatever a test does in-process, the next one starts where it did: torch's thread count
    (`configure_threads`, run by `cli.main` and `train_run`), the thread variables (`main` sets
    DDPM_THREADS for --threads) and the root logger (`main` calls logging.basicConfig)."""
    threads = torch.get_num_threads()
    environment = {name: os.environ.get(name) for name in (THREADS_ENV, "OMP_NUM_THREADS")}
    root = logging.getLogger()
    handlers, level = set(root.handlers), root.level
    yield
    torch.set_num_threads(threads)
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for handler in set(root.handlers) - handlers:  # pytest's own capture handlers are subclasses: kept
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`python -m ddpm_core ARGS` in-process: (exit status, stdout, stderr). `main` returns 0
    or raises SystemExit with the status (after writing its one-line error to stderr); any
    other exception escapes and fails the test, as a traceback would."""
    from ddpm_core.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fixed_threads(monkeypatch):
    """DDPM_THREADS set to torch's current count, so that in-process `main` calls neither
    change the thread count nor spend 0.2 s measuring the load each."""
    monkeypatch.setenv(THREADS_ENV, os.environ.get(THREADS_ENV) or str(torch.get_num_threads()))


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
