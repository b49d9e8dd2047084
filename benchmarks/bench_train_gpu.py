"""Training and sampling speed of the paper's CIFAR-10 UNet (35.7M parameters) on one GPU.

Each configuration times the trainer's own step (`Trainer.train_step`: L_simple, backward,
gradient clipping, AdamW, EMA) on a batch already on the device, so the figure is the
model's, not the data loader's:

    fp32     float32, no channels_last, no compile, AdamW unfused (the plain baseline)
    bf16     bfloat16 autocast, fused AdamW
    bf16-cl  ... and channels_last
    fast     ... and torch.compile (compile time reported apart, not in images/s)

What is measured: training images/s and ms a step, peak GPU memory; for sampling with the EMA
model, the time of one forward (inference mode) and of whole `ddpm_core.sampling.sample`
runs: DDIM with --sample-steps steps always, DDPM with all T steps with --ddpm (minutes on a
GPU at the default batch). What is projected, and filed under "projected" with how: the hours
800,000 steps at the paper's batch of 128 would take at the measured rate, and, without
--ddpm, DDPM-T images/s from the measured DDIM time a step (a DDPM step costs one forward
too). On a GPU: `python benchmarks/bench_train_gpu.py`. Any device runs it small, e.g.
`--device cpu --profile smoke --batch 8 --configs fp32,bf16-cl --sample-steps 2` (what the
tests do; bfloat16 autocast applies on CUDA only, and each result says whether it was on).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import RESULTS, time_call, write_results
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.profiles import get_profile
from ddpm_core.runtime import make_generator, resolve_device
from ddpm_core.sampling import sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.training import Trainer

CONFIGS = {
    "fp32": dict(amp=False, fused_adam=False, channels_last=False, compile=False),
    "bf16": dict(amp=True, fused_adam=True, channels_last=False, compile=False),
    "bf16-cl": dict(amp=True, fused_adam=True, channels_last=True, compile=False),
    "fast": dict(amp=True, fused_adam=True, channels_last=True, compile=True),
}
PAPER_STEPS = 800_000
FORWARD_T = 500  # the timestep of the single timed forward (the UNet's cost does not depend on t)


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
    result = {"images_per_s": batch / seconds, "step_ms": 1000 * seconds, "warmup_s": warmup_s}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["projected"] = {"hours_for_800k_steps_at_128": PAPER_STEPS * 128 / (batch / seconds) / 3600,
                           "how": f"{PAPER_STEPS:,} steps of 128 images at the measured images/s"}
    return result | {"ema_model": trainer.ema.model}


def sample_speed(model, schedule: NoiseSchedule, shape: tuple[int, ...], ddim_steps: int, repeats: int, amp: bool,
                 device: torch.device, ddpm: bool = False) -> dict:
    """Measured: one forward of the batch at t = FORWARD_T, and whole `sample` runs (median of
    `repeats` after one untimed run) of DDIM with `ddim_steps` steps and, with `ddpm`, of DDPM
    with all T steps. Without `ddpm`, DDPM-T images/s is projected from DDIM's time a step."""
    batch, T = shape[0], schedule.num_timesteps
    x_t, t = torch.randn(shape, device=device), torch.full((batch,), FORWARD_T, device=device)

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            return model(x_t, t)

    def run(sampler: str, steps: int | None) -> dict:
        generator = make_generator(0, device)
        seconds = time_call(lambda: sample(model, schedule, shape, sampler=sampler, num_steps=steps, amp=amp,
                                           generator=generator, device=device), repeats)
        steps = steps or T
        return {"steps": steps, "seconds": seconds, "images_per_s": batch / seconds,
                "ms_per_step": 1000 * seconds / steps}

    result = {"batch": batch, "amp": amp, "forward_ms": 1000 * time_call(forward, repeats),
              "ddim": run("ddim", ddim_steps)}
    if ddpm:
        result["ddpm"] = run("ddpm", None)
    else:
        per_step = result["ddim"]["seconds"] / ddim_steps
        result["projected"] = {"ddpm_images_per_s": batch / (T * per_step),
                               "how": f"{T} steps at the measured DDIM time a step ({1000 * per_step:.2f} ms); "
                                      f"measure it with --ddpm"}
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", default="cifar10-paper", help="whose model (default: the paper's CIFAR-10 UNet)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (the paper's 128)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the timed sampling runs")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed sampling runs (the median is kept)")
    parser.add_argument("--ddpm", action="store_true", help="also time whole DDPM runs of all T steps")
    parser.add_argument("--name", default="train_gpu", help="results file: RESULTS/NAME.json")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    if unknown := set(names) - set(CONFIGS):
        parser.error(f"unknown configs {sorted(unknown)}; valid choices: {', '.join(CONFIGS)}")
    device = resolve_device(args.device)
    profile = get_profile(args.profile)
    schedule = NoiseSchedule.from_config(profile.diffusion)
    image = (profile.model.in_channels, profile.model.image_size, profile.model.image_size)
    results = {"profile": args.profile, "parameters": count_parameters(build_model(profile.model)), "batch": args.batch,
               "device": str(device), "train": {}, "sample": {}}
    out = args.results / f"{args.name}_run"  # a Trainer needs a folder; these write nothing into it
    for name in names:
        speed = train_speed(profile, name, args.batch, args.steps, args.warmup, device, out)
        ema_model = speed.pop("ema_model")
        results["train"][name] = speed
        print(f"train {name:>8}: {speed['images_per_s']:8.1f} images/s, {speed['step_ms']:7.1f} ms a step "
              f"(warm-up {speed['warmup_s']:.1f} s); projected: 800k steps at batch 128 in "
              f"{speed['projected']['hours_for_800k_steps_at_128']:6.1f} h", flush=True)
        if name in ("fp32", "bf16-cl"):  # sampling in float32 and in bfloat16 (autocast on CUDA only)
            amp = CONFIGS[name]["amp"] and device.type == "cuda"
            speed = sample_speed(ema_model.eval(), schedule, (args.sample_batch, *image), args.sample_steps,
                                 args.sample_repeats, amp, device, ddpm=args.ddpm)
            results["sample"][name] = speed
            ddpm = (f"DDPM-{schedule.num_timesteps} {speed['ddpm']['images_per_s']:.2f} images/s" if args.ddpm else
                    f"projected DDPM-{schedule.num_timesteps} {speed['projected']['ddpm_images_per_s']:.2f} images/s")
            print(f"sample {name:>7}: forward {speed['forward_ms']:.1f} ms; DDIM-{args.sample_steps} "
                  f"{speed['ddim']['images_per_s']:.1f} images/s ({speed['ddim']['seconds']:.2f} s a run); {ddpm}",
                  flush=True)
        del ema_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(write_results(args.name, results, args.results))


if __name__ == "__main__":
    main()
