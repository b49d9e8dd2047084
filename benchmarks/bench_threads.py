"""Training throughput of the laptop profile under CPU contention, for 1, 2 and automatic threads.

A user's notebook rarely has the machine to itself: a browser, a second job. OpenMP splits each
operator evenly over its threads and waits for the slowest, so a thread that shares its core
with another process stalls them all. This benchmark measures images/s of the real trainer step
(`Trainer.train_step`, laptop model and batch) with torch threads = 1, 2 and the automatic
choice of `ddpm_core.runtime.configure_threads`, with and without OMP_WAIT_POLICY=PASSIVE, on
an idle machine and beside one competing CPU-bound process:

    spin     a Python process spinning in a pure-Python loop (one full core, like a busy tab)
    dutyNN   the same spinner busy NN% of each 100 ms (a browser playing a video, roughly)
    matmul   a torch process doing matrix products on 1 thread

Each measurement runs in a fresh subprocess (thread settings and OMP_WAIT_POLICY must be fixed
before torch starts). The competitor is always killed at the end.
Run: `.venv/bin/python benchmarks/bench_threads.py` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

HERE = Path(__file__).resolve().parent
CONDITIONS = {  # name: (threads, OMP_WAIT_POLICY)
    "1": ("1", None), "2": ("2", None), "auto": ("auto", None),
    "1-passive": ("1", "PASSIVE"), "2-passive": ("2", "PASSIVE"), "auto-passive": ("auto", "PASSIVE"),
}
SPINNER = "import time\nwhile True:\n    pass\n"
DUTY = ("import sys, time\nbusy = {share} * 0.1\nwhile True:\n    end = time.perf_counter() + busy\n"
        "    while time.perf_counter() < end:\n        pass\n    time.sleep(0.1 - busy)\n")
MATMUL = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nprint('ready', flush=True)\n"
          "while True:\n    a = torch.tanh(a @ a)\n")


def competitor_source(kind: str) -> str:
    """The Python source of the competing process called `kind`."""
    if kind == "spin":
        return SPINNER
    if kind == "matmul":
        return MATMUL
    if kind.startswith("duty") and kind[4:].isdigit() and 0 < int(kind[4:]) < 100:
        return DUTY.format(share=int(kind[4:]) / 100)
    raise ValueError(f"unknown competitor {kind!r}; valid: none, spin, matmul, dutyNN (NN in 1..99)")


def start_competitor(kind: str) -> subprocess.Popen | None:
    """Start the competitor and wait until it is busy; None for "none"."""
    if kind == "none":
        return None
    source = competitor_source(kind)
    process = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE, text=True)
    if kind == "matmul":
        process.stdout.readline()  # "ready": torch is imported and the products begin
    time.sleep(1.0)  # let the scheduler settle
    return process


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(condition: str, args: argparse.Namespace, competitor_pid: int | None) -> dict:
    """Run one worker subprocess under `condition` and return its JSON result."""
    threads, wait_policy = CONDITIONS[condition]
    env = {k: v for k, v in os.environ.items() if k not in ("DDPM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    command = [sys.executable, str(HERE / "bench_threads.py"), "--worker", threads,
               "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--min-steps", str(args.min_steps)]
    if competitor_pid is not None:
        command += ["--competitor-pid", str(competitor_pid)]
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"worker {condition} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(threads: str, seconds: float, warmup: int, min_steps: int, competitor_pid: int | None) -> dict:
    """Time the laptop profile's trainer step in this process; `threads` is a count or "auto"."""
    import tempfile

    import torch
    from torch.utils.data import TensorDataset

    from ddpm_core.profiles import get_profile
    from ddpm_core.runtime import configure_threads
    from ddpm_core.training import Trainer

    start = time.perf_counter()
    chosen = configure_threads(None if threads == "auto" else int(threads))
    choose_s = time.perf_counter() - start
    profile = get_profile("laptop")
    batch = profile.train.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 1, 28, 28), generator=generator) * 2 - 1  # in [-1, 1]
    labels = torch.randint(0, 10, (batch,), generator=generator)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(profile.model, profile.diffusion, profile.train, TensorDataset(images, labels), out)
        y = labels if profile.model.num_classes is not None else None
        for _ in range(warmup):
            trainer.train_step(images, y)
        competitor_before = cpu_seconds(competitor_pid) if competitor_pid else None
        steps, start = 0, time.perf_counter()
        while steps < min_steps or time.perf_counter() - start < seconds:
            trainer.train_step(images, y)
            steps += 1
        elapsed = time.perf_counter() - start
    result = {"threads": chosen, "choose_s": round(choose_s, 3), "steps": steps, "batch": batch,
              "seconds": round(elapsed, 2), "images_per_s": round(steps * batch / elapsed, 1)}
    if competitor_before is not None:  # the share of a core the competitor got meanwhile
        result["competitor_core_share"] = round((cpu_seconds(competitor_pid) - competitor_before) / elapsed, 2)
    return result


def run_competitor(kind: str, conditions: list[str], args: argparse.Namespace) -> dict:
    """Every condition beside one competitor; the competitor is killed whatever happens."""
    results = {}
    competitor = start_competitor(kind)
    try:
        for condition in conditions:
            result = results[condition] = measure(condition, args, competitor.pid if competitor else None)
            share = result.get("competitor_core_share")
            print(f"  {kind:8s} {condition:10s} threads {result['threads']}: {result['images_per_s']:6.1f} img/s "
                  f"({result['steps']} steps in {result['seconds']} s)"
                  + (f", competitor got {share:.2f} core" if share is not None else ""), flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return results


def print_table(table: dict, conditions: list[str]) -> None:
    print(f"\nimages/s, laptop profile trainer step ({os.cpu_count()} cores); auto's thread count in brackets")
    print(f"{'competitor':10s}" + "".join(f"{c:>12s}" for c in conditions))
    for kind, results in table.items():
        cells = [f"{results[c]['images_per_s']:.1f}" + (f" [{results[c]['threads']}]" if c == "auto" else "")
                 for c in conditions]
        print(f"{kind:10s}" + "".join(f"{cell:>12s}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--competitors", default="none,spin,duty30,matmul", help="comma-separated")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated from {list(CONDITIONS)}")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement (at least)")
    parser.add_argument("--min-steps", type=int, default=3, help="timed steps per measurement (at least)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--name", default="threads", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--worker", metavar="THREADS", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--competitor-pid", type=int, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seconds, args.warmup, args.min_steps, args.competitor_pid)))
        return
    kinds, conditions = args.competitors.split(","), args.conditions.split(",")
    for kind in kinds:
        if kind != "none":
            competitor_source(kind)  # refuse a bad name before anything runs
    for condition in conditions:
        if condition not in CONDITIONS:
            raise SystemExit(f"unknown condition {condition!r}; valid: {', '.join(CONDITIONS)}")
    start = time.perf_counter()
    table = {kind: run_competitor(kind, conditions, args) for kind in kinds}
    print_table(table, conditions)
    print(f"total {time.perf_counter() - start:.0f} s")
    print("results in", write_results(args.name, {
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "settings": vars(args), "results": table}))


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
