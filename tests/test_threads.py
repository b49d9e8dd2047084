"""configure_threads: explicit count, DDPM_THREADS, and the automatic choice from /proc/stat."""

import logging
import os
import time

import pytest
import torch

from ddpm_core import runtime
from ddpm_core.runtime import auto_threads, busy_cores, configure_threads, read_cpu_times

# Two made-up samples of /proc/stat, 0.2 s apart on two CPUs (fields: user nice system idle
# iowait irq softirq steal guest guest_nice). CPU 0: 18 of 20 ticks busy (user 15, system 2,
# softirq 1; idle 1, iowait 1); CPU 1: 2 of 20 busy. Together 0.9 + 0.1 = 1.0 core busy.
SAMPLE_1 = """cpu  3000 0 600 9000 100 0 20 0 0 0
cpu0 2000 0 400 4000 50 0 10 0 0 0
cpu1 1000 0 200 5000 50 0 10 0 0 0
intr 12345 0 0
ctxt 999

"""
SAMPLE_2 = """cpu  3017 0 602 9019 101 0 21 0 0 0
cpu0 2015 0 402 4001 51 0 11 0 0 0
cpu1 1002 0 200 5018 50 0 10 0 0 0
intr 12400 0 0
ctxt 1050
"""


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """Every test starts without DDPM_THREADS or OMP_NUM_THREADS and leaves torch's count as it was."""
    threads = torch.get_num_threads()
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_cores(monkeypatch):
    """A machine of two cores on which torch would use both."""
    monkeypatch.setattr(runtime, "available_cores", lambda: {0, 1})
    monkeypatch.setattr(runtime, "_TORCH_DEFAULT_THREADS", 2)


def fake_stat(tmp_path, first: str, second: str):
    """A fake /proc/stat holding `first`, and a `sleep` that replaces it by `second`."""
    path = tmp_path / "stat"
    path.write_text(first)
    return path, lambda seconds: path.write_text(second)


def test_explicit_threads_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("DDPM_THREADS", "2")
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_explicit_threads_must_be_a_positive_integer(threads):
    with pytest.raises(ValueError, match="positive integer"):
        configure_threads(threads)


@pytest.mark.parametrize("value", ["1", "3", " 2 "])
def test_ddpm_threads_is_honoured(monkeypatch, caplog, value):
    monkeypatch.setenv("DDPM_THREADS", value)
    monkeypatch.setattr(runtime, "busy_cores", lambda *a, **k: pytest.fail("measured the load"))
    with caplog.at_level(logging.INFO, logger="ddpm_core.runtime"):
        assert configure_threads() == int(value)
    assert torch.get_num_threads() == int(value)
    assert "DDPM_THREADS" in caplog.text


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "", "²"])
def test_bad_ddpm_threads_raise_naming_the_variable_and_the_range(monkeypatch, value):
    monkeypatch.setenv("DDPM_THREADS", value)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="DDPM_THREADS") as error:
        configure_threads()
    message = str(error.value)
    assert repr(value) in message and "from 1 up" in message and "\n" not in message
    assert torch.get_num_threads() == threads  # nothing was changed


def test_the_automatic_choice_is_between_one_and_the_cores_and_cheap():
    start = time.perf_counter()
    threads = configure_threads()
    assert time.perf_counter() - start < 0.5
    assert 1 <= threads <= os.cpu_count()
    assert torch.get_num_threads() == threads


def test_omp_num_threads_keeps_torchs_default(monkeypatch, two_cores):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(runtime, "busy_cores", lambda *a, **k: pytest.fail("measured the load"))
    assert configure_threads() == 2


def test_read_cpu_times_parses_the_per_cpu_lines(tmp_path):
    path = tmp_path / "stat"
    path.write_text(SAMPLE_1)
    # busy = user + nice + system + irq + softirq + steal; total adds idle and iowait
    assert read_cpu_times(path) == {0: (2410, 6460), 1: (1210, 6260)}


def test_busy_cores_from_two_made_up_samples(tmp_path, two_cores):
    path, sleep = fake_stat(tmp_path, SAMPLE_1, SAMPLE_2)
    assert busy_cores(path, interval=0.2, sleep=sleep) == pytest.approx(1.0)


def test_busy_cores_counts_only_this_process_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: {1})
    path, sleep = fake_stat(tmp_path, SAMPLE_1, SAMPLE_2)
    assert busy_cores(path, sleep=sleep) == pytest.approx(0.1)


def test_the_default_path_is_the_module_constant(tmp_path, monkeypatch, two_cores):
    path, sleep = fake_stat(tmp_path, SAMPLE_1, SAMPLE_2)
    monkeypatch.setattr(runtime, "PROC_STAT", path)
    assert busy_cores(sleep=sleep) == pytest.approx(1.0)


@pytest.mark.parametrize("busy, threads", [(0.0, 2), (0.3, 2), (0.6, 1), (1.0, 1), (1.9, 1), (5.0, 1)])
def test_automatic_choice_leaves_the_cores_others_use(monkeypatch, two_cores, busy, threads):
    monkeypatch.setattr(runtime, "busy_cores", lambda *a, **k: busy)
    assert configure_threads() == threads
    assert torch.get_num_threads() == threads


def test_automatic_choice_never_exceeds_torchs_default(monkeypatch, two_cores):
    monkeypatch.setattr(runtime, "_TORCH_DEFAULT_THREADS", 1)
    monkeypatch.setattr(runtime, "busy_cores", lambda *a, **k: 0.0)
    assert auto_threads()[0] == 1


def test_without_proc_stat_torchs_default_is_kept(tmp_path, monkeypatch, two_cores):
    monkeypatch.setattr(runtime, "PROC_STAT", tmp_path / "missing")
    assert busy_cores(interval=0.0) is None
    threads, reason = auto_threads(interval=0.0)
    assert threads == 2 and "default" in reason


@pytest.mark.parametrize("text", ["", "garbage\n", "cpu0 1 2 x\n", "intr 1 2\n"])
def test_an_unreadable_proc_stat_counts_as_missing(tmp_path, two_cores, text):
    path = tmp_path / "stat"
    path.write_text(text)
    assert busy_cores(path, interval=0.0) is None


def test_the_threads_option_reaches_torch_and_the_notebook_kernels(tmp_path, capsys):
    from conftest import run_main

    start = torch.get_num_threads()
    wanted = 1 if start != 1 else 2
    code, _, err = run_main(capsys, "sample", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "g.png",
                            "--threads", wanted)
    assert code == 2 and "no checkpoint at" in err  # refused after the threads were set
    assert torch.get_num_threads() == wanted
    assert os.environ[runtime.THREADS_ENV] == str(wanted)  # what `notebooks` hands its kernels
