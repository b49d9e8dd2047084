"""How recognisable are a checkpoint's digits? The clean-MNIST judge's verdict on N samples.

For each checkpoint and sampler setting: the fraction of samples the judge calls a digit with
>= 90% confidence, how many of the ten digits appear among those, the per-digit counts, and
the sampling time; the same fraction on real test images is the ceiling. The judge is the
notebooks' (`classifier_runs.trained_judge`: one epoch, ~99% test accuracy, cached under
runs/). This is how the `laptop` profile was tuned.

Run: `.venv/bin/python benchmarks/laptop_quality.py --data-root DIR CHECKPOINT [...]
      [--sampler ddpm --variance fixedlarge] [--sampler ddim --steps 50] [--num 200]`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import write_results
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.classifier_runs import trained_judge
from ddpm_core.config import SamplerConfig, to_dict
from ddpm_core.data import make_dataset
from ddpm_core.generation import generate
from ddpm_core.judge import judge, load_digit_classifier
from ddpm_core.plotting import save_image_grid
from ddpm_core.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-root", default=None, help="where MNIST is (default: $DDPM_DATA_ROOT, else ./data)")
    parser.add_argument("--judge", type=Path, default=None,
                        help="the clean-MNIST judge (default: runs/mnist_judge.pt, trained there if missing)")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    parser.add_argument("--variance", default="fixedlarge", choices=("fixedlarge", "fixedsmall"))
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--batch", type=int, default=None, help="samples per sampler call (default: all --num at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None, help="also save the first 100 samples as a grid")
    args = parser.parse_args()

    device = resolve_device("auto")
    judge_file = args.judge or trained_judge(args.data_root, device=device, progress=True)
    judge_model = load_digit_classifier(judge_file).to(device)
    real = torch.stack([x for x, _ in list(make_dataset("mnist", args.data_root, train=False))[: args.num]])
    results = {"judge": str(judge_file), "judge_test_accuracy": torch.load(judge_file, weights_only=True)["metadata"].get(
                   "test_accuracy"), "real_test_images": judge(judge_model, real).confident_fraction, "runs": []}
    print(f"real test images: {results['real_test_images']:.3f} judged confident")
    sampler = SamplerConfig(args.sampler, args.steps, args.variance, args.eta)
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        start = time.perf_counter()
        samples = torch.cat(list(generate(checkpoint, args.num, sampler, batch_size=args.batch or args.num,
                                          seed=args.seed, device=device)))
        seconds = time.perf_counter() - start
        verdict = judge(judge_model, samples)
        run = {"checkpoint": str(path), "step": checkpoint.metadata.get("step"), **to_dict(sampler),
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
