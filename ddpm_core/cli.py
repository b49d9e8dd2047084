"""The command line: `python -m ddpm_core COMMAND` (or the `ddpm` script).

This module owns argument parsing and wiring; every computation is a library call.
Commands: `demo` (samples from an untrained UNet with both samplers, and the schedule plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from ddpm_core.config import MNIST_SMALL_MODEL, DiffusionConfig, replace
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.plotting import plot_schedules, save_image_grid
from ddpm_core.runtime import make_generator, resolve_device, seed_everything
from ddpm_core.sampling import sample
from ddpm_core.schedule import NoiseSchedule

log = logging.getLogger("ddpm_core")


def run_demo(args: argparse.Namespace) -> dict:
    """Draw samples from an untrained small UNet with DDPM and DDIM, and plot both schedules.

    The samples are noise-like (the model is untrained): the point is that every stage of the
    pipeline runs end to end. Returns what was written and how long each sampler took.
    """
    out = Path(args.out)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    diffusion = DiffusionConfig(schedule=args.schedule, num_timesteps=args.timesteps)
    schedule = NoiseSchedule.from_config(diffusion)
    model = build_model(replace(MNIST_SMALL_MODEL, attention=args.attention)).to(device)
    shape = (args.num, MNIST_SMALL_MODEL.in_channels, MNIST_SMALL_MODEL.image_size, MNIST_SMALL_MODEL.image_size)
    report = {"parameters": count_parameters(model), "device": str(device), "files": [], "seconds": {}}

    for sampler, steps in (("ddpm", None), ("ddim", args.ddim_steps)):
        start = time.perf_counter()
        result = sample(
            model, schedule, shape, sampler=sampler, num_steps=steps,
            generator=make_generator(args.seed, device), progress=args.progress,
        )
        report["seconds"][sampler] = round(time.perf_counter() - start, 2)
        path = save_image_grid(result.samples, out / f"demo_samples_{sampler}.png")
        report["files"].append(str(path))

    fig = plot_schedules({name: NoiseSchedule.from_config(replace(diffusion, schedule=name)) for name in ("linear", "cosine")})
    path = out / "schedules.png"
    fig.savefig(path, dpi=100)
    report["files"].append(str(path))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models, step by step.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="sample an untrained UNet with both samplers; plot the schedules")
    demo.add_argument("--out", default="figures", help="folder for the PNGs (default: figures)")
    demo.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    demo.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    demo.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--num", type=int, default=16, help="number of samples per sampler")
    demo.add_argument("--ddim-steps", type=int, default=50)
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    demo.set_defaults(handler=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = args.handler(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        parser.exit(2, f"ddpm {args.command}: error: {error}\n")
    print(json.dumps(report, indent=2))
    return 0
