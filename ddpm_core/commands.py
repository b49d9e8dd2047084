"""What each command of the command line does, given its parsed arguments.

This module owns the wiring from arguments to library calls and the JSON report each command
prints; the parsing is `ddpm_core.cli`'s, every computation the library's. A handler takes
the `argparse.Namespace` and returns the report (None on a torchrun rank other than 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ddpm_core import distributed
from ddpm_core.checkpoint import Checkpoint, load_checkpoint
from ddpm_core.classifier_runs import classifier_path, train_classifier, trained_judge
from ddpm_core.config import MNIST_SMALL_MODEL, DiffusionConfig, SamplerConfig, replace
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.files import atomic_path, check_output, write_json
from ddpm_core.generation import default_batch_size, generate
from ddpm_core.likelihood import bound_report
from ddpm_core.notebooks import parse_value, run_notebooks
from ddpm_core.plotting import plot_schedules, save_figure, save_image_grid
from ddpm_core.pretrained import import_pretrained
from ddpm_core.profiles import default_profile, get_profile
from ddpm_core.runs import resolve_run, resume_run, runs_root, train_run
from ddpm_core.runtime import resolve_device, seed_everything
from ddpm_core.schedule import NoiseSchedule


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    """The sampler options of `sample` and `evaluate` as a config (checked there)."""
    return SamplerConfig(args.sampler, args.steps, args.variance, args.eta, args.spacing, amp=args.amp)


def sampler_report(sampler: SamplerConfig, num_timesteps: int) -> dict:
    """The sampler settings that applied, for a report (the other sampler's are None)."""
    ddim = sampler.sampler == "ddim"
    return {"sampler": sampler.sampler, "steps": sampler.steps(num_timesteps),
            "variance": None if ddim else sampler.variance, "eta": sampler.eta if ddim else None,
            "spacing": sampler.spacing if ddim else None}


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
    report = {"parameters": count_parameters(model), "device": str(device), "files": [], "seconds": {}}
    for sampler in (SamplerConfig("ddpm"), SamplerConfig("ddim", args.ddim_steps)):
        start = time.perf_counter()
        images = torch.cat(list(generate(model, args.num, sampler, schedule=schedule, batch_size=args.num,
                                         seed=args.seed, progress=args.progress)))
        report["seconds"][sampler.sampler] = round(time.perf_counter() - start, 2)
        report["files"].append(str(save_image_grid(images, out / f"demo_samples_{sampler.sampler}.png")))
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
    (its last.pt gives the schedule and image shape; without one, the profile's), into the
    folder under `classifier_runs.classifier_path`'s name unless --out names another file."""
    folder = Path(args.checkpoint_dir)
    device = resolve_device(args.device)
    profile = get_profile(args.profile or default_profile(device))
    model_config, diffusion = profile.model, profile.diffusion
    if (folder / "last.pt").is_file():
        checkpoint = load_checkpoint(folder / "last.pt")
        model_config, diffusion = checkpoint.model_config, checkpoint.diffusion_config
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    config = replace(profile.classifier, **{k: v for k, v in overrides.items() if v is not None})
    out = check_output(args.out or classifier_path(folder, config, diffusion))
    metadata = train_classifier(model_config, diffusion, args.dataset or profile.dataset, config, out, args.data_root,
                                device, args.progress, args.eval_images)
    return {"classifier": str(out), "device": str(device), **metadata}


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
    sampler = sampler_config(args)
    start = time.perf_counter()
    samples = torch.cat(list(generate(
        checkpoint, args.num, sampler, args.class_labels, classifier=args.classifier,
        guidance_scale=args.guidance_scale, guidance_weight=args.guidance_weight, batch_size=args.batch_size,
        seed=args.seed, device=device, use_ema=args.ema, progress=args.progress)))  # uint8 (N, C, H, W)
    seconds = time.perf_counter() - start
    report = {"checkpoint": str(args.checkpoint), "num": args.num,
              **sampler_report(sampler, checkpoint.diffusion_config.num_timesteps),
              "ema": args.ema and checkpoint.ema_state is not None, "seconds": round(seconds, 2),
              "images_per_s": round(args.num / seconds, 2), "grid": str(save_image_grid(samples[: args.grid_size], args.out))}
    if args.class_labels:
        report["classes"] = args.class_labels
        report["guidance"] = ({"classifier_free_weight": args.guidance_weight}
                              if checkpoint.model_config.num_classes is not None
                              else {"classifier": str(args.classifier), "scale": args.guidance_scale})
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
    statistics, beside the real-vs-real floor at the same number of images; with --nll N, the
    variational bound in bits/dim of N test images beside them; written to --out.
    A class-conditional checkpoint draws the classes in turn, guided by --guidance-weight."""
    if args.num_samples == 0 and not args.nll:
        raise ValueError("--num-samples 0 skips FID and IS, and no --nll N was asked for: nothing to evaluate")
    check_output(args.out)  # before hours of sampling, not after
    checkpoint = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    config = checkpoint.model_config
    dataset = args.dataset or checkpoint.metadata.get("dataset") or {1: "mnist", 3: "cifar10"}[config.in_channels]
    report = {"checkpoint": str(args.checkpoint), "checkpoint_step": checkpoint.metadata.get("step"),
              "ema": args.ema and checkpoint.ema_state is not None, "seed": args.seed, "device": str(device)}
    if args.num_samples:
        report.update(sample_scores(args, checkpoint, dataset, device))
    if args.nll:
        report["nll"] = bound_scores(args, checkpoint, dataset, device)
    write_json(args.out, report)
    return report


def sample_scores(args: argparse.Namespace, checkpoint: Checkpoint, dataset: str, device: torch.device) -> dict:
    """`evaluate`'s FID and IS part, with the floor."""
    from ddpm_core.evaluation import Evaluator  # torchmetrics: seconds to import, so here

    config, sampler = checkpoint.model_config, sampler_config(args)
    metric = args.metric if args.metric != "auto" else ("mnist" if dataset == "mnist" else "inception")
    judge = (args.judge or trained_judge(args.data_root, device=device, progress=args.progress)) if metric == "mnist" else None
    evaluator = Evaluator(metric, dataset, Path(args.stats_dir) if args.stats_dir else runs_root() / "fid_stats",
                          args.data_root, device, judge=judge, inception=args.inception_weights, progress=args.progress)
    start, batch_size = time.perf_counter(), args.batch_size or default_batch_size(device)
    labels = range(config.num_classes) if config.num_classes is not None else None
    scores = evaluator.score(generate(checkpoint, args.num_samples, sampler, labels, guidance_weight=args.guidance_weight,
                                      batch_size=batch_size, seed=args.seed, device=device, use_ema=args.ema,
                                      progress=args.progress), seed=args.seed)
    seconds = time.perf_counter() - start
    report = {
        "metric": metric, "feature_extractor": evaluator.extractor.identity,
        **{name: scores[name] for name in ("fid", "inception_score", "inception_score_std")},
        "num_samples": args.num_samples,
        **sampler_report(sampler, checkpoint.diffusion_config.num_timesteps),
        "guidance_weight": args.guidance_weight if config.num_classes is not None else None,
        "batch_size": batch_size,
        "reference": {"dataset": dataset, "split": "train", "num_images": evaluator.reference_size,
                      "file": str(evaluator.reference_file)},
        "seconds": round(seconds, 2), "samples_per_s": round(args.num_samples / seconds, 2),
    }
    if metric == "mnist":
        report["note"] = "MNIST FID (the judge's 128 features), not comparable with Inception FID"
    if args.floor:
        start = time.perf_counter()
        report["floor"] = {**evaluator.floor(args.num_samples, seed=args.seed),
                           "seconds": round(time.perf_counter() - start, 2)}
    return report


def bound_scores(args: argparse.Namespace, checkpoint: Checkpoint, dataset: str, device: torch.device) -> dict:
    """`evaluate --nll N`: the variational bound of N test images in bits/dim, term by term
    (`likelihood.bound_report`), with the reverse process's variance (--variance)."""
    from ddpm_core.evaluation import test_set_bound

    if checkpoint.model_config.num_classes is not None:
        raise ValueError("--nll bounds an unconditional model's likelihood; this checkpoint is class-conditional")
    model = checkpoint.build_model(use_ema=args.ema).to(device)
    schedule = NoiseSchedule.from_config(checkpoint.diffusion_config)
    start = time.perf_counter()
    bound = test_set_bound(model, schedule, dataset, args.data_root, args.nll, args.batch_size or 100, args.variance,
                           seed=args.seed, progress=args.progress)
    seconds = time.perf_counter() - start
    return {**bound_report(bound), "split": "test", "dataset": dataset, "variance": args.variance,
            "clip_denoised": True, "timesteps": schedule.num_timesteps, "seconds": round(seconds, 2),
            "images_per_s": round(args.nll / seconds, 3),
            "forward_passes_per_s": round(args.nll * schedule.num_timesteps / seconds, 1)}


def run_notebooks_command(args: argparse.Namespace) -> dict:
    """The numbered notebooks in order through papermill: what `make run` runs."""
    parameters = {"profile": args.profile, "device": args.device}
    parameters.update({name: parse_value(value) for name, value in args.parameter or []})
    report = run_notebooks(args.notebooks, args.out, parameters, prepare_only=args.prepare_only,
                           progress=args.progress)
    return {"out": args.out, "parameters": parameters, "notebooks": report}


def run_import_pretrained(args: argparse.Namespace) -> dict:
    """Convert diffusers' DDPM UNet (a Hugging Face id or a local folder) into a checkpoint."""
    checkpoint = import_pretrained(args.source, args.out, cache_dir=args.cache_dir, force=args.force)
    return {
        "source": args.source, "checkpoint": str(args.out),
        "parameters": sum(v.numel() for v in checkpoint.model_state.values()),
        "model_config": checkpoint.model_config.__dict__, "diffusion_config": checkpoint.diffusion_config.__dict__,
    }
