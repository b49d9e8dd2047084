"""The command line: `python -m ddpm_core COMMAND` (or the `ddpm` script).

This module owns argument parsing and wiring; every computation is a library call.
Commands: `demo` (samples from an untrained UNet with both samplers, and the schedule plot),
`train` (a profile on MNIST, CIFAR-10 or an image folder), `train-classifier` (the noise-aware
classifier for guidance), `sample` (draw images from a checkpoint, optionally guided towards
chosen classes), `evaluate` (FID and IS of a checkpoint's samples), `notebooks` (the papermill
batch), `import-pretrained` (the authors' weights).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ddpm_core import distributed
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.classifier import load_noisy_classifier
from ddpm_core.config import MNIST_SMALL_MODEL, DiffusionConfig, replace
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.files import atomic_path, check_output, to_json, write_json
from ddpm_core.guidance import ClassifierFreeGuidance, classifier_guidance
from ddpm_core.plotting import plot_schedules, save_figure, save_image_grid, to_uint8
from ddpm_core.pretrained import import_pretrained
from ddpm_core.notebooks import NotebookFailed, parse_value, run_notebooks
from ddpm_core.profiles import default_profile, get_profile
from ddpm_core.runs import resolve_run, resume_run, runs_root, train_classifier, train_run, trained_judge
from ddpm_core.runtime import configure_threads, make_generator, resolve_device, seed_everything
from ddpm_core.sampling import sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.training import TrainingInterrupted

log = logging.getLogger("ddpm_core")
# torch-fidelity's InceptionV3 weights, as `evaluation.INCEPTION_FILE` names them (a test checks
# the two agree); written out so that `--help` needs no torchmetrics import.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def run_demo(args: argparse.Namespace) -> dict:
    """Draw samples from an untrained small UNet with DDPM and DDIM, and plot both schedules.

    The samples are noise-like (the model is untrained): the point is that every stage of the
    pipeline runs end to end. Returns what was written and how long each sampler took.
    """
    out = check_output(args.out, "folder")
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
    report["files"].append(str(save_figure(fig, out / "schedules.png")))
    return report


def run_train(args: argparse.Namespace) -> dict | None:
    """Train a profile, with the command line's overrides, into --out; under torchrun, on every
    rank (DistributedDataParallel), with only rank 0 writing and reporting. With --resume, the
    run continues as its last.pt recorded it: options that would change its weights are
    refused, and the ones it can honour (--steps, logging, speed) are applied and reported."""
    check_output(args.out, "folder")
    place, device = distributed.setup(args.device)
    try:
        options = dict(
            dataset=args.dataset, schedule=args.schedule, attention=args.attention, base_channels=args.base_channels,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, seed=args.seed,
            amp=args.amp, compile=args.compile, channels_last=args.channels_last, fused_adam=args.fused_adam,
            pin_memory=args.pin_memory, num_workers=args.num_workers,
            num_classes=10 if args.class_conditional else None,
            label_dropout=args.label_dropout if args.class_conditional else None,
        )
        changes = {}
        if args.resume:
            spec, changes = resume_run(args.out, profile=args.profile, **options)
            if changes and place.is_main:
                print(f"ddpm train: resuming {args.out} with " + ", ".join(
                    f"{name} {old} -> {new}" for name, (old, new) in changes.items()), file=sys.stderr)
        else:
            spec = resolve_run(args.profile or default_profile(device), **options)
        result = train_run(spec, args.out, args.data_root, device, resume=args.resume, progress=args.progress,
                           holdout_images=args.holdout_images, place=place)
    finally:
        distributed.teardown()
    if not place.is_main:
        return None
    return {"out": args.out, "step": result.step,
            "final_loss": None if result.final_loss is None else round(result.final_loss, 5),
            "images_per_s": round(result.images_per_s, 1), "seconds": round(result.seconds, 1),
            "checkpoint": str(result.checkpoint), "device": str(device), "processes": place.world_size,
            **({"resumed_with": {name: list(pair) for name, pair in changes.items()}} if changes else {})}


def run_train_classifier(args: argparse.Namespace) -> dict:
    """Train the noise-aware classifier p_phi(y | x_t, t) for the diffusion of a run folder
    (its last.pt gives the schedule and image shape; without one, the profile's)."""
    folder = Path(args.checkpoint_dir)
    out = check_output(args.out if args.out else folder / "noisy_classifier.pt")
    device = resolve_device(args.device)
    profile = get_profile(args.profile or default_profile(device))
    model_config, diffusion = profile.model, profile.diffusion
    if (folder / "last.pt").is_file():
        checkpoint = load_checkpoint(folder / "last.pt")
        model_config, diffusion = checkpoint.model_config, checkpoint.diffusion_config
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    config = replace(profile.classifier, **{k: v for k, v in overrides.items() if v is not None})
    metadata = train_classifier(model_config, diffusion, args.dataset or profile.dataset, config, out, args.data_root,
                                device, args.progress, args.eval_images)
    return {"classifier": str(out), "device": str(device), **metadata}


def guided_model(args: argparse.Namespace, checkpoint, model, device) -> tuple:
    """What `sample` runs for --class: the model (wrapped for classifier-free guidance when the
    checkpoint is class-conditional) and the noise-aware classifier, if one guides it."""
    if not args.class_labels:
        if args.classifier:
            raise ValueError("--classifier needs the classes to draw: --class N [N ...]")
        return model, None
    if checkpoint.model_config.num_classes is not None:  # classifier-free guidance
        if args.classifier:
            raise ValueError("this checkpoint is class-conditional: guide it with --guidance-weight, not --classifier")
        return ClassifierFreeGuidance(model, args.guidance_weight), None
    if not args.classifier:
        raise ValueError("this checkpoint is unconditional: --class needs --classifier PATH "
                         "(python -m ddpm_core train-classifier), or sample a class-conditional checkpoint")
    classifier, diffusion = load_noisy_classifier(args.classifier, device)
    if diffusion != checkpoint.diffusion_config:
        raise ValueError(f"the classifier was trained for {diffusion}, the checkpoint uses "
                         f"{checkpoint.diffusion_config}; train a classifier for this checkpoint's schedule")
    return model, classifier


def run_sample(args: argparse.Namespace) -> dict:
    """Draw `--num` images from a checkpoint in batches; write a grid, optionally all images.
    With --class, guided towards those classes (cycled over the images): by a noise-aware
    classifier (--classifier, --guidance-scale) or, for a class-conditional checkpoint,
    classifier-free (--guidance-weight). Every output path is checked before sampling starts."""
    for path, kind in ((args.out, "file"), (args.save_tensor, "file"), (args.save_images, "folder")):
        if path:
            check_output(path, kind)
    checkpoint = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = checkpoint.build_model(use_ema=args.ema).to(device)
    model, classifier = guided_model(args, checkpoint, model, device)
    schedule = NoiseSchedule.from_config(checkpoint.diffusion_config)
    config = checkpoint.model_config
    labels = torch.tensor(args.class_labels or [0]).repeat(args.num)[: args.num]  # cycled over the images
    num_classes = config.num_classes or (classifier.num_classes if classifier is not None else None)
    if args.class_labels and not all(0 <= c < num_classes for c in args.class_labels):
        raise ValueError(f"--class takes labels 0 to {num_classes - 1}, got {args.class_labels}")
    generator = make_generator(args.seed, device)
    images, start = [], time.perf_counter()
    for first in range(0, args.num, args.batch_size):
        shape = (min(args.batch_size, args.num - first), config.in_channels, config.image_size, config.image_size)
        y = labels[first: first + shape[0]].to(device)
        result = sample(
            model, schedule, shape, sampler=args.sampler, num_steps=args.steps, variance=args.variance,
            eta=args.eta, spacing=args.spacing, generator=generator, progress=args.progress, amp=args.amp,
            y=y if args.class_labels and classifier is None else None,
            guidance=classifier_guidance(classifier, y, args.guidance_scale) if classifier is not None else None,
        )
        images.append(to_uint8(result.samples))  # (B, C, H, W) uint8 on the CPU
    samples = torch.cat(images)
    seconds = time.perf_counter() - start
    grid = save_image_grid(samples[: args.grid_size].float() / 127.5 - 1, args.out)
    report = {
        "checkpoint": str(args.checkpoint), "num": args.num, "sampler": args.sampler,
        "steps": args.steps or (checkpoint.diffusion_config.num_timesteps if args.sampler == "ddpm" else 50),
        "variance": args.variance if args.sampler == "ddpm" else None,
        "eta": args.eta if args.sampler == "ddim" else None, "ema": args.ema and checkpoint.ema_state is not None,
        "seconds": round(seconds, 2), "images_per_s": round(args.num / seconds, 2), "grid": str(grid),
    }
    if args.class_labels:
        report["classes"] = args.class_labels
        report["guidance"] = ({"classifier": str(args.classifier), "scale": args.guidance_scale} if classifier is not None
                              else {"classifier_free_weight": args.guidance_weight})
    if args.save_tensor:
        with atomic_path(args.save_tensor) as tmp:
            torch.save(samples, tmp)  # uint8 (N, C, H, W), as images are stored
        report["tensor"] = str(args.save_tensor)
    if args.save_images:
        report["images"] = str(save_images(samples, Path(args.save_images)))
    return report


def save_images(samples: torch.Tensor, folder: Path) -> Path:
    """One PNG per uint8 image (N, C, H, W), the input FID tools such as torch-fidelity read."""
    from PIL import Image

    for index, image in enumerate(samples):  # run_sample checked the folder before sampling
        array = image.permute(1, 2, 0).squeeze(-1).numpy()  # (H, W[, C])
        with atomic_path(folder / f"{index:06d}.png", durable=False) as tmp:
            Image.fromarray(array).save(tmp)
    return folder


def run_evaluate(args: argparse.Namespace) -> dict:
    """FID and IS of `--num-samples` images from a checkpoint against the training set's cached
    statistics, beside the real-vs-real floor at the same number of images; written to --out."""
    from ddpm_core.evaluation import Evaluator, generated_batches  # torchmetrics: seconds to import, so here

    check_output(args.out)  # before hours of sampling, not after
    checkpoint = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    config = checkpoint.model_config
    dataset = args.dataset or checkpoint.metadata.get("dataset") or {1: "mnist", 3: "cifar10"}[config.in_channels]
    metric = args.metric if args.metric != "auto" else ("mnist" if dataset == "mnist" else "inception")
    judge = None
    if metric == "mnist":
        judge = args.judge or trained_judge(args.data_root, device=device, progress=args.progress)
    stats_dir = Path(args.stats_dir) if args.stats_dir else runs_root() / "fid_stats"
    evaluator = Evaluator(metric, dataset, stats_dir, args.data_root, device, judge=judge,
                          inception=args.inception_weights, progress=args.progress)
    steps = args.steps or (checkpoint.diffusion_config.num_timesteps if args.sampler == "ddpm" else 50)
    start = time.perf_counter()
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    batches = generated_batches(
        checkpoint, args.num_samples, batch_size, use_ema=args.ema, guidance_weight=args.guidance_weight,
        seed=args.seed, device=device, progress=args.progress, sampler=args.sampler, num_steps=args.steps,
        variance=args.variance, eta=args.eta, spacing=args.spacing, amp=args.amp)
    scores = evaluator.score(batches, seed=args.seed)
    seconds = time.perf_counter() - start
    report = {
        "metric": metric, "feature_extractor": evaluator.extractor.identity,
        "fid": scores["fid"], "inception_score": scores["inception_score"],
        "inception_score_std": scores["inception_score_std"], "num_samples": args.num_samples,
        "checkpoint": str(args.checkpoint), "checkpoint_step": checkpoint.metadata.get("step"),
        "ema": args.ema and checkpoint.ema_state is not None,
        "sampler": args.sampler, "steps": steps, "variance": args.variance if args.sampler == "ddpm" else None,
        "eta": args.eta if args.sampler == "ddim" else None, "spacing": args.spacing if args.sampler == "ddim" else None,
        "guidance_weight": args.guidance_weight if config.num_classes is not None else None, "seed": args.seed,
        "batch_size": batch_size,
        "reference": {"dataset": dataset, "split": "train", "num_images": evaluator.reference_size,
                      "file": str(evaluator.reference_file)},
        "device": str(device), "seconds": round(seconds, 2), "samples_per_s": round(args.num_samples / seconds, 2),
    }
    if metric == "mnist":
        report["note"] = "MNIST FID (the judge's 128 features), not comparable with Inception FID"
    if args.floor:
        start = time.perf_counter()
        report["floor"] = {**evaluator.floor(args.num_samples, seed=args.seed),
                           "seconds": round(time.perf_counter() - start, 2)}
    write_json(args.out, report)
    return report


def run_notebooks_command(args: argparse.Namespace) -> dict:
    """The numbered notebooks in order through papermill: what `make run` runs."""
    parameters = {"profile": args.profile, "device": args.device}
    parameters.update({name: parse_value(value) for name, value in args.parameter or []})
    report = run_notebooks(args.notebooks, args.out, parameters, prepare_only=args.prepare_only,
                           progress=args.progress)
    return {"out": args.out, "parameters": parameters, "notebooks": report}


def run_import_pretrained(args: argparse.Namespace) -> dict:
    checkpoint = import_pretrained(args.source, args.out, cache_dir=args.cache_dir, force=args.force)
    return {
        "source": args.source, "checkpoint": str(args.out),
        "parameters": sum(v.numel() for v in checkpoint.model_state.values()),
        "model_config": checkpoint.model_config.__dict__, "diffusion_config": checkpoint.diffusion_config.__dict__,
    }


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one `--help` away), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(minimum: int):
    """An argparse type: a whole number >= `minimum`, refused with the valid range otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (valid: >= {minimum})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def number(minimum: float = -math.inf, below: float = math.inf, positive: bool = False):
    """An argparse type: a finite float in [minimum, below) (> 0 with `positive`); NaN, inf and
    anything out of range are refused with the valid range."""
    valid = "> 0" if positive else f"in [{minimum:g}, {below:g})" if below < math.inf else f">= {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (valid: {valid})") from None
        if not math.isfinite(value) or value < minimum or value >= below or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {valid}, got {text}")
        return value

    return parse


def add_runtime_arguments(parser: argparse.ArgumentParser, with_seed: bool = True, seed: int | None = 0) -> None:
    """What every command that computes shares: the device, the seed, threads and progress."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    if with_seed:
        parser.add_argument("--seed", type=integer(0), default=seed,
                            help="seeds every random draw" + (" (default: the profile's)" if seed is None else ""))
    parser.add_argument("--threads", type=integer(1), default=None,
                        help="CPU threads (default: $DDPM_THREADS, else the cores other programs leave free)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """What `sample` and `evaluate` share: the checkpoint, the sampler and how it runs."""
    parser.add_argument("--checkpoint", required=True, help="a ddpm_core checkpoint (.pt)")
    parser.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    parser.add_argument("--variance", default="fixedlarge", choices=["fixedlarge", "fixedsmall"],
                        help="DDPM only: sigma^2 = beta_t (the paper's CIFAR-10 choice) or beta_tilde_t")
    parser.add_argument("--steps", type=integer(1), default=None, help="DDIM steps S (default 50); DDPM always takes T")
    parser.add_argument("--eta", type=number(0), default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic"], help="DDIM only")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast (GPU)")
    add_runtime_arguments(parser)


def add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="sample an untrained UNet with both samplers; plot the schedules")
    demo.add_argument("--out", default="figures", help="folder for the PNGs (default: figures)")
    demo.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    demo.add_argument("--timesteps", type=integer(2), default=1000, help="T, the number of diffusion steps")
    demo.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--num", type=integer(1), default=16, help="number of samples per sampler")
    demo.add_argument("--ddim-steps", type=integer(1), default=50)
    add_runtime_arguments(demo)
    demo.set_defaults(handler=run_demo)


def add_train(commands) -> None:
    train = commands.add_parser("train", help="train a profile (smoke, laptop, mnist-gpu, cifar10-paper); "
                                "several GPUs: torchrun --nproc_per_node N -m ddpm_core train ...")
    train.add_argument("--profile", default=None,
                       help="smoke, laptop, mnist-gpu or cifar10-paper (default: mnist-gpu on CUDA, else laptop)")
    train.add_argument("--out", required=True, help="run folder: last.pt, log.jsonl")
    train.add_argument("--dataset", default=None, help="mnist, cifar10 or folder (default: the profile's)")
    train.add_argument("--data-root", default=None, help="default: $DDPM_DATA_ROOT, else ./data")
    train.add_argument("--schedule", default=None, help="linear or cosine (default: the profile's)")
    train.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last.pt, with its own settings (--steps may grow)")
    train.add_argument("--steps", type=integer(1), default=None)
    train.add_argument("--batch-size", type=integer(1), default=None)
    train.add_argument("--lr", type=number(positive=True), default=None)
    train.add_argument("--lr-decay", default=None, help="constant or cosine, after warmup (default: the profile's)")
    train.add_argument("--base-channels", type=integer(32), default=None, help="a multiple of 32")
    train.add_argument("--holdout-images", type=integer(1), default=128, help="test images that judge best.pt")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast (CUDA)")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="(CUDA)")
    train.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                       help="AdamW's fused kernel (CUDA; on by default)")
    train.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None,
                       help="page-locked batches, copied to the GPU without blocking (CUDA; on by default)")
    train.add_argument("--num-workers", type=integer(0), default=None, help="data-loader processes (default: the profile's)")
    train.add_argument("--class-conditional", action="store_true",
                       help="train eps(x_t, t, y) with label dropout, for classifier-free guidance")
    train.add_argument("--label-dropout", type=number(0, below=1), default=0.1,
                       help="with --class-conditional (default 0.1)")
    add_runtime_arguments(train, seed=None)
    train.set_defaults(handler=run_train)


def add_train_classifier(commands) -> None:
    classify = commands.add_parser("train-classifier", help="train the noise-aware classifier for classifier guidance")
    classify.add_argument("--checkpoint-dir", required=True,
                          help="the diffusion run's folder: its last.pt sets schedule and shape; the classifier goes here")
    classify.add_argument("--profile", default=None, help="whose classifier budget (default: as for train)")
    classify.add_argument("--out", default=None, help="default: CHECKPOINT_DIR/noisy_classifier.pt")
    classify.add_argument("--dataset", default=None, help="mnist or cifar10 (default: the profile's)")
    classify.add_argument("--data-root", default=None, help="default: $DDPM_DATA_ROOT, else ./data")
    classify.add_argument("--steps", type=integer(1), default=None)
    classify.add_argument("--batch-size", type=integer(1), default=None)
    classify.add_argument("--lr", type=number(positive=True), default=None)
    classify.add_argument("--eval-images", type=integer(0), default=1000,
                          help="test images for the accuracy-by-t report (0: none)")
    add_runtime_arguments(classify, seed=None)
    classify.set_defaults(handler=run_train_classifier)


def add_sample(commands) -> None:
    draw = commands.add_parser("sample", help="draw images from a checkpoint (its configs travel inside it)")
    add_sampling_arguments(draw)
    draw.add_argument("--class", dest="class_labels", type=integer(0), nargs="+", default=None, metavar="N",
                      help="guide towards these classes, cycled over the images")
    draw.add_argument("--classifier", default=None, help="noise-aware classifier for an unconditional checkpoint")
    draw.add_argument("--guidance-scale", type=number(0), default=1.0, help="classifier guidance scale s")
    draw.add_argument("--guidance-weight", type=number(0), default=1.0,
                      help="classifier-free guidance weight w (class-conditional checkpoints)")
    draw.add_argument("--num", type=integer(1), default=64, help="number of images")
    draw.add_argument("--batch-size", type=integer(1), default=256)
    draw.add_argument("--out", default="samples.png", help="PNG grid of the first --grid-size images")
    draw.add_argument("--grid-size", type=integer(1), default=64)
    draw.add_argument("--save-tensor", default=None, help="also save every image as a uint8 (N, C, H, W) tensor")
    draw.add_argument("--save-images", default=None, help="also write every image as a PNG into this folder")
    draw.set_defaults(handler=run_sample)


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="FID and Inception Score of a checkpoint's samples")
    add_sampling_arguments(evaluate)
    evaluate.add_argument("--num-samples", type=integer(2), default=50_000,
                          help="images to generate (the paper: 50,000; fewer biases FID upward; FID needs 2)")
    evaluate.add_argument("--metric", default="auto", choices=["auto", "inception", "mnist"],
                          help="inception (the paper's; default for CIFAR-10) or mnist (the judge's features)")
    evaluate.add_argument("--dataset", default=None, choices=["mnist", "cifar10"],
                          help="the reference training set (default: the checkpoint's)")
    evaluate.add_argument("--data-root", default=None, help="where the datasets are (default ./data)")
    evaluate.add_argument("--stats-dir", default=None, help="reference statistics cache (default runs/fid_stats)")
    evaluate.add_argument("--judge", default=None, help="the MNIST judge (default runs/mnist_judge.pt, trained if missing)")
    evaluate.add_argument("--inception-weights", default=None,
                          help=f"torch-fidelity's {INCEPTION_FILE} (default: torch's hub cache)")
    evaluate.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                          help="also score real held-out images at the same number (the best FID reachable)")
    evaluate.add_argument("--guidance-weight", type=number(0), default=None,
                          help="class-conditional checkpoints: classifier-free guidance weight w")
    evaluate.add_argument("--out", default="metrics.json", help="where to write the JSON report")
    evaluate.add_argument("--batch-size", type=integer(1), default=None,
                          help="default: 256 on a GPU, 64 on a CPU (faster there)")
    evaluate.set_defaults(handler=run_evaluate)


def add_notebooks(commands) -> None:
    notebooks = commands.add_parser("notebooks", help="run the numbered notebooks in order with papermill (make run)")
    notebooks.add_argument("--profile", default="auto", help="auto (laptop on a CPU, mnist-gpu on CUDA) or a name")
    notebooks.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                           help="any other notebook parameter, e.g. -p seed 1 -p schedule cosine")
    notebooks.add_argument("--notebooks", default="notebooks", help="folder of the numbered notebooks")
    notebooks.add_argument("--out", default="build/notebooks", help="folder for the executed copies")
    notebooks.add_argument("--prepare-only", action="store_true", help="inject the parameters, run nothing (nbval)")
    add_runtime_arguments(notebooks, with_seed=False)
    notebooks.set_defaults(handler=run_notebooks_command)


def add_import_pretrained(commands) -> None:
    pretrained = commands.add_parser(
        "import-pretrained", help="convert diffusers' DDPM UNet (e.g. google/ddpm-cifar10-32) into a checkpoint"
    )
    pretrained.add_argument("source", help="a Hugging Face repository id, or a local folder with config.json and weights")
    pretrained.add_argument("--out", required=True, help="where to write the ddpm_core checkpoint")
    pretrained.add_argument("--force", action="store_true", help="replace --out if it exists")
    pretrained.add_argument("--cache-dir", default=None, help="Hugging Face download cache")
    pretrained.set_defaults(handler=run_import_pretrained)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models, step by step.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_demo, add_train, add_train_classifier, add_sample, add_evaluate, add_notebooks,
                add_import_pretrained):
        add(commands)
    return parser


def one_line(error: BaseException) -> str:
    """An error's message on one line. A DataLoader worker's error arrives wrapped in its
    traceback ("Caught X in DataLoader worker ... Original Traceback ..."): its last line is the
    error itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "Original Traceback" in str(error) else " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = f"ddpm {args.command}"
    try:
        if getattr(args, "threads", None) is not None:
            os.environ["DDPM_THREADS"] = str(args.threads)  # notebook kernels read it too
        configure_threads()
        report = args.handler(args)
    except TrainingInterrupted as stop:  # the step finished and last.pt holds it
        parser.exit(128 + stop.signum, f"{name}: stopped by {signal.Signals(stop.signum).name} after step {stop.step}; "
                                       f"{stop.checkpoint} holds it: continue with "
                                       f"`python -m ddpm_core train --out {stop.checkpoint.parent} --resume`\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{name}: interrupted; files written before now are intact\n")
    except (ValueError, OSError, FloatingPointError, NotebookFailed) as error:  # bad input: one line, no traceback
        parser.exit(2, f"{name}: error: {one_line(error)}\n")
    if report is not None:  # None: a torchrun rank other than 0, which reports nothing
        print(to_json(report))
    return 0
