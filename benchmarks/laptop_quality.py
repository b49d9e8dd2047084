"""How recognisable are a checkpoint's digits? The clean-MNIST judge's verdict on N samples.

For each checkpoint and sampler setting: the fraction of samples the judge calls a digit with
>= 90% confidence, how many of the ten digits appear among those, the per-digit counts, and
the sampling time; the same fraction on real test images is the ceiling. The judge is trained
once (one epoch, ~99% test accuracy) and cached. This is how the `laptop` profile was tuned.

Run: `.venv/bin/python benchmarks/laptop_quality.py --data-root DIR CHECKPOINT [...]
      [--sampler ddpm --variance fixedlarge] [--sampler ddim --steps 50] [--num 200]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import RESULTS, write_results
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.data import make_dataset
from ddpm_core.judge import (
    classifier_accuracy, judge, load_digit_classifier, save_digit_classifier, train_digit_classifier,
)
from ddpm_core.plotting import save_image_grid
from ddpm_core.runtime import make_generator, resolve_device
from ddpm_core.sampling import sample
from ddpm_core.schedule import NoiseSchedule


def cached_judge(path: Path, data_root: str | None):
    if path.exists():
        return load_digit_classifier(path), None
    model = train_digit_classifier(make_dataset("mnist", data_root), epochs=1, progress=True)
    accuracy = classifier_accuracy(model, make_dataset("mnist", data_root, train=False))
    save_digit_classifier(model, path, {"test_accuracy": accuracy})
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-root", default=None, help="where MNIST is (default: $DDPM_DATA_ROOT, else ./data)")
    parser.add_argument("--judge", type=Path, default=RESULTS / "digit_classifier.pt")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    parser.add_argument("--variance", default="fixedlarge", choices=("fixedlarge", "fixedsmall"))
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None, help="also save the first 100 samples as a grid")
    args = parser.parse_args()

    device = resolve_device("auto")
    judge_model, judge_accuracy = cached_judge(args.judge, args.data_root)
    real = torch.stack([x for x, _ in list(make_dataset("mnist", args.data_root, train=False))[: args.num]])
    results = {"judge": str(args.judge), "judge_test_accuracy": judge_accuracy,
               "real_test_images": judge(judge_model, real).confident_fraction, "runs": []}
    print(f"real test images: {results['real_test_images']:.3f} judged confident")
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        model = checkpoint.build_model().to(device)
        schedule = NoiseSchedule.from_config(checkpoint.diffusion_config).to(device)
        shape = (args.num, 1, checkpoint.model_config.image_size, checkpoint.model_config.image_size)
        start = time.perf_counter()
        samples = sample(model, schedule, shape, sampler=args.sampler, num_steps=args.steps,
                         variance=args.variance, eta=args.eta, generator=make_generator(args.seed, device)).samples.cpu()
        seconds = time.perf_counter() - start
        verdict = judge(judge_model, samples)
        run = {"checkpoint": str(path), "step": checkpoint.metadata.get("step"), "sampler": args.sampler,
               "variance": args.variance if args.sampler == "ddpm" else None, "steps": args.steps,
               "eta": args.eta if args.sampler == "ddim" else None,
               "num": args.num, "confident_fraction": verdict.confident_fraction,
               "classes_seen": verdict.classes_seen, "class_counts": verdict.class_counts,
               "sampling_seconds": round(seconds, 1)}
        results["runs"].append(run)
        print(run)
        if args.grid:
            save_image_grid(samples[:100], args.grid.with_name(f"{args.grid.stem}_{path.parent.name}.png"), nrow=10)
    write_results("laptop_quality", results)


if __name__ == "__main__":
    main()
