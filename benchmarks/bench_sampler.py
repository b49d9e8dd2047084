"""Sampler overhead: the reverse loop with a trivial model against the same loop with a UNet.

The overhead per step (the step arithmetic, noise, bookkeeping) must stay under 2% of one
UNet forward. Run: `.venv/bin/python benchmarks/bench_sampler.py [--device cuda]`.
"""

from __future__ import annotations

import argparse

import torch

from common import time_call, write_results
from ddpm_core.config import DiffusionConfig
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.profiles import get_profile
from ddpm_core.runtime import resolve_device
from ddpm_core.sampling import ddim_sample, ddpm_sample
from ddpm_core.schedule import NoiseSchedule


def trivial_model(x_t, t, y=None):
    return x_t  # costs one read: the loop's own work is what remains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=100, help="T for the DDPM loop (DDIM uses S = steps / 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(get_profile("laptop").model).to(device).eval()
    schedule = NoiseSchedule.from_config(DiffusionConfig("linear", args.steps))
    rows = []
    for batch in args.batches:
        shape = (batch, 1, 28, 28)
        for name, loop, steps in (
            ("ddpm", lambda m: ddpm_sample(m, schedule, shape, device=device), args.steps),
            ("ddim", lambda m: ddim_sample(m, schedule, shape, num_steps=args.steps // 2, eta=1.0, device=device), args.steps // 2),
        ):
            overhead = time_call(lambda: loop(trivial_model), args.repeats) / steps
            with_unet = time_call(lambda: loop(model), args.repeats) / steps
            forward = with_unet - overhead
            rows.append({
                "sampler": name, "batch": batch, "steps": steps,
                "overhead_ms_per_step": round(overhead * 1e3, 4),
                "unet_forward_ms": round(forward * 1e3, 2),
                "overhead_percent": round(100 * overhead / forward, 3),
            })
            print(f"{name:5s} batch {batch:3d}: loop overhead {overhead * 1e3:7.3f} ms/step, "
                  f"UNet forward {forward * 1e3:8.2f} ms -> {100 * overhead / forward:5.2f}%")
    path = write_results("sampler_overhead", {
        "device": str(device), "model_parameters": count_parameters(model), "rows": rows,
    })
    worst = max(row["overhead_percent"] for row in rows)
    print(f"worst overhead {worst:.2f}% of a UNet forward (goal <= 2%); results in {path}")


if __name__ == "__main__":
    main()
