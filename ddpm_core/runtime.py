"""Where code runs and how it is seeded: device selection, CPU threads, the one seeding
function, and the signals a run catches to stop cleanly.

This module owns the choice of device, of the number of CPU threads torch uses, the global
seeds and the handling of SIGINT / SIGTERM; it holds no model or data code.

CPU threads: torch's default is one thread per core, which is the fastest choice on an idle
machine and the slowest on a busy one. OpenMP splits every operator evenly over its threads and
waits for the slowest, so when another process (a browser, a second job) takes one of two cores,
every operator waits for the thread that lost its core. benchmarks/bench_threads.py, laptop
profile on 2 cores beside one spinning process: 2 threads 25-27 images/s, 1 thread 33-49 (its
idle rate); idle: 2 threads 61-94, 1 thread 45-49. `configure_threads` therefore leaves the
cores that others keep busy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ddpm_core.config import check_choice

DeviceName = Literal["auto", "cpu", "cuda", "mps"]

log = logging.getLogger(__name__)

THREADS_ENV = "DDPM_THREADS"  # an explicit thread count, for the command line, notebooks and CI
PROGRESS_ENV = "DDPM_PROGRESS"  # "text": plain-text progress bars (what a headless batch's kernels get)
TEXT_BAR_INTERVAL_S = 10.0  # a text bar redraws at most this often, so a batch's log stays short
PROC_STAT = Path("/proc/stat")  # Linux's CPU time counters (a module constant, so tests can fake it)
LOAD_SAMPLE_S = 0.2  # how long `configure_threads` watches the load before choosing
# A core counts as taken when other processes keep at least this share of it busy. Beside a
# process busy 30% of the time, 2 threads still beat 1 (57 vs 44 images/s, bench_threads.py);
# beside a full-time one, 1 thread wins (above).
TAKEN_CORE_SHARE = 0.5
_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anyone sets it: one per (physical) core


def resolve_device(name: DeviceName | str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; a named device must be available."""
    kind = name.split(":")[0]  # "cuda:1" is a CUDA device too
    check_choice(kind, DeviceName, "device")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but is not available; use --device cpu or auto")
    return torch.device(name)


def on_with_a_gpu(value: bool | str, name: str, device: torch.device) -> bool:
    """A notebook switch that is True, False or "auto": "auto" runs the costly part where it is
    cheap (a CUDA device) and leaves it opt-in on a CPU. Anything else is refused, named."""
    if value not in (True, False, "auto"):
        raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    return device.type == "cuda" if value == "auto" else value


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); return a CPU generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (samplers draw their noise there), seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)


def configure_threads(threads: int | None = None) -> int:
    """Set the number of CPU threads torch uses (`torch.set_num_threads`) and return it.

    The first of: `threads` if given; the environment variable DDPM_THREADS (a positive
    integer, anything else raises ValueError); torch's default if OMP_NUM_THREADS is set (the
    user chose already); otherwise, on Linux, one thread per core that other processes leave
    free (measured from /proc/stat over LOAD_SAMPLE_S seconds), at least 1 and at most torch's
    default; without /proc/stat, torch's default. Logs the choice and the reason at INFO.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer (1, 2, ...), got {threads!r}")
        chosen, reason = threads, "asked for"
    elif THREADS_ENV in os.environ:
        chosen, reason = parse_threads(os.environ[THREADS_ENV]), f"{THREADS_ENV} is set"
    elif "OMP_NUM_THREADS" in os.environ:
        chosen, reason = _TORCH_DEFAULT_THREADS, "torch's default, as OMP_NUM_THREADS is set"
    else:
        chosen, reason = auto_threads()
    torch.set_num_threads(chosen)
    log.info("using %d CPU thread(s): %s", chosen, reason)
    return chosen


def parse_threads(value: str) -> int:
    """DDPM_THREADS's value as a thread count; a concise ValueError unless it is a positive integer."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r} is not a thread count: use a whole number from 1 up "
                         f"(this machine has {os.cpu_count()} cores), or unset it for the automatic choice")
    return int(text)


def auto_threads(path: Path | None = None, interval: float | None = None) -> tuple[int, str]:
    """The automatic thread count and why: torch's default less the cores others keep busy."""
    cores = available_cores()
    busy = busy_cores(path, interval)
    if busy is None:
        return _TORCH_DEFAULT_THREADS, "torch's default (no /proc/stat here to measure the load)"
    taken = math.floor(busy + 1.0 - TAKEN_CORE_SHARE)  # cores that count as taken by others
    chosen = max(1, min(_TORCH_DEFAULT_THREADS, len(cores) - taken))
    return chosen, (f"other processes keep {busy:.1f} of {len(cores)} cores busy; "
                    f"set {THREADS_ENV} to choose yourself")


def available_cores() -> set[int]:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def read_cpu_times(path: Path | None = None) -> dict[int, tuple[int, int]]:
    """Per CPU, (busy, total) time since boot from /proc/stat's `cpuN` lines, in clock ticks.

    Fields: user nice system idle iowait irq softirq steal (guest time is already in user);
    idle and iowait are idle, the rest busy.
    """
    times = {}
    for line in (path or PROC_STAT).read_text().splitlines():
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_cores(path: Path | None = None, interval: float | None = None,
               sleep: Callable[[float], None] = time.sleep) -> float | None:
    """How many of this process's cores the rest of the system kept busy during `interval` s.

    Two samples of `path` (PROC_STAT), `interval` (LOAD_SAMPLE_S) apart; this process sleeps
    meanwhile, so the load is the others'. None where the file cannot be read or parsed
    (macOS, Windows, odd kernels).
    """
    cores = available_cores()
    try:
        before = read_cpu_times(path)
        sleep(LOAD_SAMPLE_S if interval is None else interval)
        after = read_cpu_times(path)
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu in cores & before.keys() & after.keys():
        ticks = after[cpu][1] - before[cpu][1]
        if ticks > 0:
            busy += (after[cpu][0] - before[cpu][0]) / ticks
    return busy if cores & before.keys() & after.keys() else None


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM are recorded in the list it yields
    instead of killing the process mid-step, so the loop can save and stop; a second signal
    interrupts at once. Only the main thread can catch signals: elsewhere nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def progress_bar(*args, **kwargs):
    """A tqdm bar: tqdm.auto's (a widget in a notebook, text in a terminal); with
    $DDPM_PROGRESS=text, a plain-text one on stderr redrawn at most every TEXT_BAR_INTERVAL_S.
    A headless batch sets that for its kernels, so that their bars (what is trained, how far,
    the rate, the time left) reach the terminal that runs it (`notebooks.run_notebooks`)."""
    if os.environ.get(PROGRESS_ENV) == "text":
        from tqdm.std import tqdm
        kwargs.setdefault("mininterval", TEXT_BAR_INTERVAL_S)
    else:
        from tqdm.auto import tqdm
    return tqdm(*args, **kwargs)
