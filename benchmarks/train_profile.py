"""Train a profile (with overrides) and report what the laptop tuning table holds.

One row of the README's tuning table: the change, its training compute (TFLOP, forward and
backward, counted with `torch.utils.flop_counter` as `denoisers.training_flops_per_image`),
the training's wall time and images/s, MNIST FID of N samples (the judge's features,
against the 60,000 training images) with DDIM-50 (eta 1, or --eta and --spacing) and, with
--ddpm, DDPM-1000, the share of samples the judge calls a digit with >= 90% confidence, and
the smallest digit's share of those (1.0: every digit at its tenth); with --nll N, the
variational bound of N test images in bits/dim. The real-vs-real floor at the same N is
reported beside them, and so is the confident share of N real test images: the most a
sampler can be expected to reach with this judge (one epoch of training leaves it unsure of
some real digits). The run is trained once into RUNS_ROOT/PROFILE-mnist-KEY (the notebooks'
folder when RUNS_ROOT is theirs) and found there again.

Run: `.venv/bin/python benchmarks/train_profile.py --label "8 groups" --set model.norm_groups=8
      [--set train.lr=4e-3 ...] [--scale 0.25] [--samples 1000] [--ddpm] [--raw] [--nll 32]
      [--sampling-seeds 0 1 2] [--eta 0 --spacing quadratic]`
(several sampling seeds score the same weights on several noise draws: the row holds their
means, and each draw is kept in the results.)
(--scale 0.25 trains a quarter of the steps and warmup: the cheap screen before a full run;
`--set model.prediction=x0 --set train.objective=vlb` are Table 2's rows, notebook 06).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import RESULTS, write_results
from ddpm_core.checkpoint import Checkpoint, load_checkpoint
from ddpm_core.classifier_runs import trained_judge
from ddpm_core.config import RunSpec, SamplerConfig, replace
from ddpm_core.denoisers import training_flops_per_image
from ddpm_core.evaluation import Evaluator, dataset_batches, test_set_bound
from ddpm_core.generation import generate
from ddpm_core.judge import judge, load_digit_classifier
from ddpm_core.likelihood import bound_report
from ddpm_core.notebooks import parse_value
from ddpm_core.plotting import save_image_grid
from ddpm_core.runs import resolve_run, run_dir, runs_root, trained_checkpoint
from ddpm_core.runtime import configure_threads, resolve_device
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.train_state import read_log

SAMPLERS = {"ddim50": SamplerConfig("ddim", 50, eta=1.0), "ddpm1000": SamplerConfig("ddpm", variance="fixedlarge")}


def parse_setting(text: str) -> tuple[str, str, object]:
    """"train.lr=4e-3" -> ("train", "lr", 0.004); values read as the notebooks' -p values are
    (`notebooks.parse_value`: Python literals, lists for tuples, else the plain string)."""
    name, sep, raw = text.partition("=")
    section, dot, field = name.partition(".")
    if not (sep and dot and section in ("model", "diffusion", "train")):
        raise SystemExit(f"--set {text!r}: write SECTION.FIELD=VALUE, SECTION one of model, diffusion, train")
    return section, field, parse_value(raw)


def spec_for(profile: str, settings: list[str], scale: float) -> RunSpec:
    spec = resolve_run(profile)
    changes: dict[str, dict] = {"model": {}, "diffusion": {}, "train": {}}
    for text in settings:
        section, field, value = parse_setting(text)
        changes[section][field] = value
    spec = replace(spec, **{section: replace(getattr(spec, section), **fields)
                            for section, fields in changes.items() if fields})
    if scale != 1.0:  # a screen: fewer steps, the same schedule's shape, files only at the end
        train = spec.train
        steps = max(1, round(train.steps * scale))
        spec = replace(spec, train=replace(train, steps=steps, warmup_steps=round(train.warmup_steps * scale),
                                           checkpoint_every=steps, sample_every=0, snapshot_every=0))
    return spec


def score(checkpoint: Checkpoint, sampler: SamplerConfig, num: int, evaluator: Evaluator, judge_model, device,
          use_ema: bool, grid: Path | None, seed: int = 0) -> dict:
    start = time.perf_counter()
    samples = torch.cat(list(generate(checkpoint, num, sampler,
                                      seed=seed, device=device, use_ema=use_ema, progress=True)))
    seconds = time.perf_counter() - start
    scores = evaluator.score(samples.split(250), seed=0)
    verdict = judge(judge_model, samples)
    counts = verdict.class_counts
    if grid is not None:
        save_image_grid(samples[:100], grid, nrow=10)
    return {"fid": round(scores["fid"], 2), "inception_score": round(scores["inception_score"], 2),
            "confident_fraction": verdict.confident_fraction, "class_counts": counts,
            "smallest_class_share": round(min(counts) / (sum(counts) / len(counts)), 3) if sum(counts) else 0.0,
            "sampling_seconds": round(seconds, 1)}


def over_draws(draws: list[dict]) -> dict:
    """One row from the scores of several sampling draws (`score`'s dicts): the mean FID, IS and
    confident share, the smallest digit's share on any draw, the total sampling time, and the
    draws themselves. With one draw, its own numbers."""
    def mean(field: str) -> float:
        return sum(d[field] for d in draws) / len(draws)

    return {"fid": round(mean("fid"), 2), "inception_score": round(mean("inception_score"), 2),
            "confident_fraction": mean("confident_fraction"),
            "smallest_class_share": min(d["smallest_class_share"] for d in draws),
            "sampling_seconds": round(sum(d["sampling_seconds"] for d in draws), 1), "draws": draws}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this script shares with the others that train and score a profile (ema_sweep.py)."""
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--data-root", default=None, help="where MNIST is (default: $DDPM_DATA_ROOT, else ./data)")
    parser.add_argument("--runs-root", default=None, help="where runs are cached (default: $DDPM_RUNS_ROOT, else ./runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")


def judge_and_evaluator(args: argparse.Namespace, device) -> tuple[torch.nn.Module, Evaluator]:
    """The judge (trained now if missing) and an MNIST FID evaluator with its features."""
    judge_file = trained_judge(args.data_root, root=args.runs_root, device=device, progress=True)
    evaluator = Evaluator("mnist", "mnist", runs_root(args.runs_root) / "fid_stats", args.data_root, device,
                          judge=judge_file)
    return load_digit_classifier(judge_file).to(device), evaluator


def real_confident_fraction(judge_model, data_root, num: int) -> float:
    """The judge's confident share on `num` held-out test images (the floor's draw): its ceiling."""
    real = torch.cat(list(dataset_batches("mnist", data_root, train=False, num_images=num, seed=0)))
    return round(judge(judge_model, real).confident_fraction, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--label", required=True, help="the change, as the table's first column names it")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the profile's steps and warmup")
    parser.add_argument("--sampling-seeds", "--sampling-seed", dest="sampling_seeds", type=int, nargs="+",
                        default=[0], metavar="SEED",
                        help="the samplers' noise: each seed scores the same weights on another draw (the row: means)")
    parser.add_argument("--eta", type=float, default=1.0, help="the DDIM-50 rows' eta (the table's: 1)")
    parser.add_argument("--spacing", default="uniform", choices=("uniform", "quadratic"),
                        help="the DDIM-50 rows' timesteps (the table's: uniform)")
    parser.add_argument("--ddpm", action="store_true", help="also DDPM-1000 (20x DDIM-50's sampling time)")
    parser.add_argument("--raw", action="store_true", help="also the raw (not EMA) weights, with DDIM-50")
    parser.add_argument("--nll", type=int, default=0, metavar="N",
                        help="also the variational bound in bits/dim of N test images (EMA weights, sigma^2 = beta_t)")
    args = parser.parse_args()

    threads = configure_threads(args.threads)
    device = resolve_device(args.device)
    spec = spec_for(args.profile, args.set, args.scale)
    flops = training_flops_per_image(spec.model)
    tflop = flops * spec.train.batch_size * spec.train.steps / 1e12
    print(f"{args.label}: {spec.profile} {spec.train.steps} steps x {spec.train.batch_size}, "
          f"{flops / 1e9:.3f} GFLOP per image, {tflop:.1f} TFLOP of training, on {threads} thread(s)")
    last = trained_checkpoint(spec, args.data_root, device, root=args.runs_root, progress=True)
    log = [line for line in read_log(last.parent / "log.jsonl") if "elapsed_s" in line]
    judge_model, evaluator = judge_and_evaluator(args, device)
    name = "".join(c if c.isalnum() else "_" for c in args.label).strip("_").lower()
    grids = RESULTS / "train_profile"
    runs = {"ddim50": ("ddim50", True)}
    if args.ddpm:
        runs["ddpm1000"] = ("ddpm1000", True)
    if args.raw:
        runs["ddim50_raw"] = ("ddim50", False)
    results = {
        "label": args.label, "profile": spec.profile, "run": str(run_dir(spec, args.runs_root)), "scale": args.scale,
        "settings": args.set, "sampling_seeds": args.sampling_seeds, "ddim_eta": args.eta, "ddim_spacing": args.spacing,
        "steps": spec.train.steps,
        "batch_size": spec.train.batch_size,
        "gflop_per_image": round(flops / 1e9, 4), "training_tflop": round(tflop, 1), "threads": threads,
        "training_seconds": round(log[-1]["elapsed_s"], 1) if log else None,
        "images_per_s": round(spec.train.batch_size * spec.train.steps / log[-1]["elapsed_s"], 1) if log else None,
        "floor": round(evaluator.floor(args.samples)["fid"], 2), "samples": args.samples,
        "real_confident_fraction": real_confident_fraction(judge_model, args.data_root, args.samples),
    }
    samplers = {**SAMPLERS, "ddim50": replace(SAMPLERS["ddim50"], eta=args.eta, spacing=args.spacing)}
    checkpoint = load_checkpoint(last)  # read once for every sampler row
    for key, (sampler, use_ema) in runs.items():
        draws = [{"sampling_seed": seed,
                  **score(checkpoint, samplers[sampler], args.samples, evaluator, judge_model, device, use_ema,
                          grids / f"{name}_{key}.png" if i == 0 else None, seed=seed)}
                 for i, seed in enumerate(args.sampling_seeds)]
        results[key] = over_draws(draws)
        print(key, draws if len(draws) > 1 else draws[0])
    if args.nll:
        start = time.perf_counter()
        bound = test_set_bound(checkpoint.build_model().to(device), NoiseSchedule.from_config(checkpoint.diffusion_config),
                               "mnist", args.data_root, args.nll, seed=0, progress=True)
        results["nll"] = {**bound_report(bound), "seconds": round(time.perf_counter() - start, 1)}
        print("nll", results["nll"])
    path = write_results(name, results, grids)
    ddpm = results.get("ddpm1000", {}).get("fid", "-")
    bits = f" {results['nll']['bits_per_dim']:.3f} bits/dim |" if args.nll else ""
    means = f"; means of {len(args.sampling_seeds)} sampling draws" if len(args.sampling_seeds) > 1 else ""
    print(f"| {args.label} | {tflop:.0f} | {results['training_seconds'] or 0:.0f} s | {results['ddim50']['fid']} | "
          f"{ddpm} | {results['ddim50']['confident_fraction']:.1%} |{bits}   ({path}; real test images: "
          f"{results['real_confident_fraction']:.1%} confident, FID floor {results['floor']}{means})")


if __name__ == "__main__":
    main()
