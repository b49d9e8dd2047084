"""Does guidance draw the digit that was asked for? The clean-MNIST judge's accuracy against scale.

Classifier guidance: the profile's unconditional model plus its noise-aware classifier, at
scales s. Classifier-free guidance: the same profile made class-conditional and trained with
label dropout 0.1 (same steps, batch and model), at weights w. For each setting N samples
(labels 0-9 in turn) are drawn with the same sampler and starting noise; the judge (a separate
CNN trained on clean MNIST) reports the share classified as the requested digit, the share it
is confident about (>= 90%), and the time. Grids (a row per digit) go to benchmarks/results/.
Every model is trained on first use and cached under runs/ (the notebooks share them).

Run: `.venv/bin/python benchmarks/guidance_accuracy.py --data-root DIR [--profile laptop]
      [--num 500] [--scales 0 1 2 5 10] [--weights 0 1 2 5] [--sampler ddim --steps 50 --eta 1]`
"""

from __future__ import annotations

import argparse
import time

import torch

from common import RESULTS, machine, write_results
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.classifier_runs import trained_classifier, trained_judge
from ddpm_core.config import SamplerConfig, to_dict
from ddpm_core.generation import generate, load_guidance_classifier
from ddpm_core.judge import judge, load_digit_classifier
from ddpm_core.plotting import save_image_grid
from ddpm_core.runs import class_conditional, resolve_run, trained_checkpoint
from ddpm_core.runtime import resolve_device
from ddpm_core.schedule import NoiseSchedule


def grid_rows(samples: torch.Tensor, labels: torch.Tensor, per_row: int = 10) -> torch.Tensor:
    """The first `per_row` samples of each digit, digit 0 in the first row."""
    return torch.cat([samples[labels == digit][:per_row] for digit in range(10)])


def score(name: str, value: float, samples: torch.Tensor, labels: torch.Tensor, judge_model, seconds: float,
          tag: str = "") -> dict:
    verdict = judge(judge_model, samples)
    row = {"guidance": name, "scale": value, "num": len(labels),
           "accuracy": (verdict.labels == labels).float().mean().item(),
           "confident_and_correct": ((verdict.labels == labels) & (verdict.confidence >= 0.9)).float().mean().item(),
           "confident_fraction": verdict.confident_fraction, "seconds": round(seconds, 1)}
    save_image_grid(grid_rows(samples, labels), RESULTS / f"guidance{tag}_{name}_{value:g}.png", nrow=10)
    print(row, flush=True)
    return row


def trained_models(args: argparse.Namespace, spec, device) -> dict[str, tuple]:
    """The networks, trained on first use and cached under runs/: {name: (path, seconds to get)}. The
    class-conditional model (a second training run) only when classifier-free `--weights` are asked for."""
    makers = {
        "unconditional model": lambda: trained_checkpoint(spec, args.data_root, device, progress=True),
        "conditional model": lambda: trained_checkpoint(class_conditional(spec), args.data_root, device, progress=True),
        "noisy classifier": lambda: args.classifier or trained_classifier(spec, args.data_root, device, progress=True),
        "judge": lambda: trained_judge(args.data_root, device=device),
    }
    if not args.weights:
        del makers["conditional model"]
    timings = {}
    for name, make in makers.items():
        start = time.perf_counter()
        timings[name] = (make(), round(time.perf_counter() - start, 1))
        print(f"{name}: {timings[name][0]} ({timings[name][1]} s)", flush=True)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--data-root", default=None, help="where MNIST is (default: $DDPM_DATA_ROOT, else ./data)")
    parser.add_argument("--num", type=int, default=500, help="samples per scale")
    parser.add_argument("--scales", type=float, nargs="*", default=[0, 1, 2, 5, 10])
    parser.add_argument("--weights", type=float, nargs="*", default=[0, 1, 2, 5])
    parser.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    parser.add_argument("--batch", type=int, default=250, help="samples per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix for the result files, to keep several runs apart")
    parser.add_argument("--classifier", default=None,
                        help="a noise-aware classifier file to use instead of the profile's (e.g. from train-classifier)")
    args = parser.parse_args()

    device = resolve_device("auto")
    spec = resolve_run(args.profile)
    timings = trained_models(args, spec, device)
    judge_model = load_digit_classifier(timings["judge"][0]).to(device)
    labels = torch.arange(args.num) % 10
    sampler = SamplerConfig(args.sampler, args.steps if args.sampler == "ddim" else None, eta=args.eta)

    # built and loaded once, so that each row times the sampling alone
    unconditional = load_checkpoint(timings["unconditional model"][0])
    classifier = load_guidance_classifier(timings["noisy classifier"][0], unconditional, device)
    schedule = NoiseSchedule.from_config(unconditional.diffusion_config)

    def draw(model, **guidance) -> tuple[torch.Tensor, float]:
        """The samples for `labels` (the same starting noise for every setting) and their time."""
        start = time.perf_counter()
        samples = torch.cat(list(generate(model, args.num, sampler, labels, schedule=schedule, batch_size=args.batch,
                                          seed=args.seed, device=device, **guidance)))
        return samples, time.perf_counter() - start

    rows = []
    model = unconditional.build_model().to(device)
    for s in args.scales:
        samples, seconds = draw(model, classifier=classifier, guidance_scale=s)
        rows.append(score("classifier", s, samples, labels, judge_model, seconds, args.tag))
    if args.weights:
        model = load_checkpoint(timings["conditional model"][0]).build_model().to(device)
    for w in args.weights:
        samples, seconds = draw(model, guidance_weight=w)
        rows.append(score("classifier-free", w, samples, labels, judge_model, seconds, args.tag))
    write_results(f"guidance_accuracy{args.tag}", {
        "machine": machine(), "profile": args.profile, "sampler": to_dict(sampler), "num_per_scale": args.num,
        "models": {name: {"path": str(path), "seconds_to_get": secs} for name, (path, secs) in timings.items()},
        "classifier_training": torch.load(timings["noisy classifier"][0], weights_only=True)["metadata"],
        "rows": rows,
    })


if __name__ == "__main__":
    main()
