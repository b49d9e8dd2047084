"""Training and sampling speed of the paper's CIFAR-10 UNet (35.7M parameters) on one GPU.

Each configuration times the trainer's own step (`Trainer.train_step`: L_simple, backward,
gradient clipping, AdamW, EMA) on a batch already on the device, so the figure is the
model's, not the data loader's:

    fp32     float32, no channels_last, no compile, AdamW unfused (the plain baseline)
    bf16     bfloat16 autocast, fused AdamW
    bf16-cl  ... and channels_last
    fast     ... and torch.compile (compile time reported apart, not in images/s)

It reports images/s, peak GPU memory, the hours 800,000 steps at the paper's batch of 128
would take, and sampling speed (the EMA model's forward in inference mode: images/s for
DDPM-1000 and DDIM-50). On a GPU: `python benchmarks/bench_train_gpu.py`. Any device runs
it small, e.g. `--device cpu --profile smoke --batch 8 --configs fp32,bf16-cl` (what the
tests do).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from common import RESULTS, time_call, write_results
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.profiles import get_profile
from ddpm_core.runtime import resolve_device
from ddpm_core.training import Trainer

CONFIGS = {
    "fp32": dict(amp=False, fused_adam=False, channels_last=False, compile=False),
    "bf16": dict(amp=True, fused_adam=True, channels_last=False, compile=False),
    "bf16-cl": dict(amp=True, fused_adam=True, channels_last=True, compile=False),
    "fast": dict(amp=True, fused_adam=True, channels_last=True, compile=True),
}
PAPER_STEPS = 800_000


def train_speed(profile, name: str, batch: int, steps: int, warmup: int, device: torch.device, out) -> dict:
    """images/s of `steps` timed training steps after `warmup` (which include any compilation)."""
    train = replace(profile.train, batch_size=batch, steps=PAPER_STEPS, warmup_steps=1, **CONFIGS[name])
    trainer = Trainer(profile.model, profile.diffusion, train, [], out, device)
    shape = (batch, profile.model.in_channels, profile.model.image_size, profile.model.image_size)
    x0 = torch.randn(shape, device=device).clamp(-1, 1)
    if train.channels_last and device.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(x0, None)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    seconds = time_call(lambda: trainer.train_step(x0, None), steps, warmup=0) if steps else float("nan")
    result = {"images_per_s": batch / seconds, "step_ms": 1000 * seconds, "warmup_s": warmup_s,
              "hours_for_800k_steps_at_128": PAPER_STEPS * 128 / (batch / seconds) / 3600}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result | {"ema_model": trainer.ema.model}


def sample_speed(model, profile, batch: int, repeats: int, amp: bool, device: torch.device) -> dict:
    """Images/s of DDPM-1000 and DDIM-50 from the time of one model evaluation on `batch` images."""
    shape = (batch, profile.model.in_channels, profile.model.image_size, profile.model.image_size)
    x_t, t = torch.randn(shape, device=device), torch.full((batch,), 500, device=device)

    def evaluate():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp and device.type == "cuda"):
            return model(x_t, t)
    seconds = time_call(evaluate, repeats)
    return {"batch": batch, "forward_ms": 1000 * seconds, "ddpm1000_images_per_s": batch / (1000 * seconds),
            "ddim50_images_per_s": batch / (50 * seconds)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", default="cifar10-paper", help="whose model (default: the paper's CIFAR-10 UNet)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (the paper's 128)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--name", default="train_gpu", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    names = args.configs.split(",")
    if unknown := set(names) - set(CONFIGS):
        parser.error(f"unknown configs {sorted(unknown)}; valid choices: {', '.join(CONFIGS)}")
    device = resolve_device(args.device)
    profile = get_profile(args.profile)
    results = {"profile": args.profile, "parameters": count_parameters(build_model(profile.model)), "batch": args.batch,
               "device": str(device), "train": {}, "sample": {}}
    out = RESULTS / f"{args.name}_run"  # a Trainer needs a folder; these write nothing into it
    for name in names:
        speed = train_speed(profile, name, args.batch, args.steps, args.warmup, device, out)
        ema_model = speed.pop("ema_model")
        results["train"][name] = speed
        print(f"train {name:>8}: {speed['images_per_s']:8.1f} images/s, {speed['step_ms']:7.1f} ms a step, "
              f"800k steps at batch 128: {speed['hours_for_800k_steps_at_128']:6.1f} h "
              f"(warm-up {speed['warmup_s']:.1f} s)", flush=True)
        if name in ("fp32", "bf16-cl"):  # sampling in float32 and in bfloat16
            amp = CONFIGS[name]["amp"]
            results["sample"][name] = sample_speed(ema_model.eval(), profile, args.sample_batch, 5, amp, device)
            print(f"sample {name:>7}: DDPM-1000 {results['sample'][name]['ddpm1000_images_per_s']:.2f} images/s, "
                  f"DDIM-50 {results['sample'][name]['ddim50_images_per_s']:.1f} images/s", flush=True)
        del ema_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(write_results(args.name, results))


if __name__ == "__main__":
    main()
