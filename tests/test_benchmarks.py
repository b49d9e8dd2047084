"""The GPU benchmark runs on the CPU path too (small), so its code is never left untested."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_train_benchmark_runs_small_on_the_cpu():
    name = "test_bench_train_gpu"
    result_file = BENCHMARKS / "results" / f"{name}.json"
    try:
        done = subprocess.run(
            [sys.executable, "bench_train_gpu.py", "--device", "cpu", "--profile", "smoke", "--batch", "4",
             "--steps", "1", "--warmup", "1", "--configs", "fp32,bf16-cl", "--sample-batch", "2", "--name", name],
            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads(result_file.read_text())
    finally:
        result_file.unlink(missing_ok=True)
    assert results["device"] == "cpu" and set(results["train"]) == {"fp32", "bf16-cl"}
    for speed in results["train"].values():
        assert speed["images_per_s"] > 0
        # the projection is the measured rate carried to 800k steps of 128 images
        assert speed["hours_for_800k_steps_at_128"] * 3600 * speed["images_per_s"] == \
            pytest.approx(800_000 * 128)
    assert results["sample"]["fp32"]["ddpm1000_images_per_s"] * 20 == \
        pytest.approx(results["sample"]["fp32"]["ddim50_images_per_s"])
