"""Shared helpers for the benchmarks: timing with warm-up, and writing results."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddpm_core.files import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of one call of `fn` over `repeats` timed calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_results(name: str, results: dict, folder: Path = RESULTS) -> Path:
    """FOLDER/NAME.json (benchmarks/results by default) with the machine's description, written atomically."""
    return write_json(Path(folder) / f"{name}.json", {"machine": machine(), **results})
