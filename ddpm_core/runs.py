"""Training runs on disk: a profile with its overrides resolved into one configuration, and
one folder per configuration, so that the command line and every notebook train it once and
find it again.

This module owns the resolution of a run's settings and where its files live; the
optimisation loop is `ddpm_core.training`'s, the file format `ddpm_core.checkpoint`'s, the
classifiers trained for a run (guidance, the judge) `ddpm_core.classifier_runs`'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ddpm_core.checkpoint import load_checkpoint, stored_config
from ddpm_core.config import DatasetName, RunSpec, TrainConfig, check_choice, replace
from ddpm_core.data import SHAPES, make_dataset
from ddpm_core.distributed import Distributed
from ddpm_core.profiles import PROFILES, default_profile, get_profile
from ddpm_core.runtime import configure_threads, resolve_device
from ddpm_core.training import RESUMABLE, Trainer, TrainResult, resume_conflicts

log = logging.getLogger(__name__)

def resolve_run(profile: str, dataset: DatasetName | None = None, schedule: str | None = None,
                attention: bool | None = None, base_channels: int | None = None, num_classes: int | None = None,
                **train_overrides) -> RunSpec:
    """A profile with overrides applied; None means "the profile's value". Unknown names and
    bad values raise ValueError listing the valid choices. `num_classes` makes the model
    class-conditional (with `label_dropout` for classifier-free guidance)."""
    base = get_profile(profile)
    model = base.model
    if base_channels is not None:
        model = replace(model, base_channels=base_channels)
    if num_classes is not None:
        model = replace(model, num_classes=num_classes)
    if attention is not None:
        model = replace(model, attention=attention)
    diffusion = replace(base.diffusion, schedule=schedule) if schedule is not None else base.diffusion
    train = replace(base.train, **{k: v for k, v in train_overrides.items() if v is not None})
    dataset = dataset or base.dataset
    check_choice(dataset, DatasetName, "dataset")
    if dataset in SHAPES and SHAPES[dataset] != (model.image_size, model.in_channels):
        size, channels = SHAPES[dataset]
        fits = [name for name, p in PROFILES.items() if (p.model.image_size, p.model.in_channels) == (size, channels)]
        raise ValueError(f"profile {base.name!r} builds a {model.image_size}x{model.image_size} model with "
                         f"{model.in_channels} channel(s), but {dataset} images are {size}x{size} with {channels}; "
                         f"profiles for {dataset}: {', '.join(fits)}")
    return RunSpec(base.name, dataset, model, diffusion, train)


def resume_run(out: str | Path, profile: str | None = None, dataset: DatasetName | None = None,
               schedule: str | None = None, attention: bool | None = None, base_channels: int | None = None,
               num_classes: int | None = None, **train_overrides) -> tuple[RunSpec, dict[str, tuple]]:
    """The run in `out` as its last.pt recorded it, for `--resume`: the same arguments as
    `resolve_run`, where None means "as the run was trained". What a resumed run can honour
    (`training.RESUMABLE`: steps, logging, speed) is applied and returned as {name: (old, new)};
    any other setting that differs is refused with a ValueError naming each one."""
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last} to continue from; drop --resume to start there")
    checkpoint = load_checkpoint(last)
    if not isinstance((checkpoint.train_state or {}).get("train_config"), dict):
        raise ValueError(f"{last} holds weights only (no training state); it cannot be resumed")
    trained = stored_config(checkpoint.train_state, "train_config", TrainConfig, last)
    model, meta = checkpoint.model_config, checkpoint.metadata
    asked = {"profile": (profile, meta.get("profile")), "dataset": (dataset, meta.get("dataset")),
             "schedule": (schedule, checkpoint.diffusion_config.schedule), "attention": (attention, model.attention),
             "base_channels": (base_channels, model.base_channels), "num_classes": (num_classes, model.num_classes)}
    refused = [f"{name} {old!r} -> {new!r}" for name, (new, old) in asked.items() if new is not None and new != old]
    requested = replace(trained, **{k: v for k, v in train_overrides.items() if v is not None})
    refused += resume_conflicts(trained, requested)
    step = checkpoint.metadata.get("step", 0)
    if requested.steps < step:
        refused.append(f"steps {trained.steps} -> {requested.steps}, past the {requested.steps} steps asked for "
                       f"(it is at step {step}: pass --steps {step} or more)")
    if refused:
        raise ValueError(f"{out} was trained with other settings ({'; '.join(refused)}); a resumed run keeps them: "
                         f"drop those options, or train into a new --out")
    changes = {name: (getattr(trained, name), getattr(requested, name)) for name in RESUMABLE
               if getattr(trained, name) != getattr(requested, name)}
    spec = RunSpec(meta.get("profile", "custom"), meta.get("dataset", "mnist"), model, checkpoint.diffusion_config,
                   requested)
    return spec, changes


def resolve_parameters(profile: str, dataset: DatasetName | None, schedule: str | None, attention: bool | None,
                       device: str) -> tuple[RunSpec, torch.device]:
    """The notebooks' parameters checked and resolved: "auto" picks the device (CUDA, MPS,
    CPU) and then the profile (mnist-gpu on CUDA, laptop elsewhere). Changes nothing."""
    resolved_device = resolve_device(device)
    name = default_profile(resolved_device) if profile == "auto" else profile
    spec = resolve_run(name, dataset=dataset, schedule=schedule, attention=attention)
    return spec, resolved_device


def resolve_notebook(profile: str, dataset: DatasetName | None, schedule: str | None, attention: bool | None,
                     device: str) -> tuple[RunSpec, torch.device]:
    """The notebooks' setup: `resolve_parameters`, and the CPU threads set as for the command
    line (`runtime.configure_threads`: $DDPM_THREADS, else the cores left free)."""
    spec, resolved_device = resolve_parameters(profile, dataset, schedule, attention, device)
    configure_threads()
    return spec, resolved_device


def runs_root(root: str | Path | None = None) -> Path:
    """Where cached runs live: `root`, else $DDPM_RUNS_ROOT, else ./runs (ignored by git)."""
    return Path(root or os.environ.get("DDPM_RUNS_ROOT") or "runs")


def run_dir(spec: RunSpec, root: str | Path | None = None) -> Path:
    return runs_root(root) / f"{spec.profile}-{spec.dataset}-{spec.key}"


def train_run(spec: RunSpec, out: str | Path, data_root: str | Path | None = None,
              device: str | torch.device = "cpu", resume: bool = False, progress: bool = False,
              holdout_images: int = 128, place: Distributed = Distributed(),
              extra_hooks: Sequence = ()) -> TrainResult:
    """Train `spec` into `out` (resuming from out/last.pt with `resume`); under torchrun,
    `place` is this rank's (`ddpm_core.distributed.setup`). `extra_hooks`: `Trainer.run`'s."""
    model = spec.model
    holdout = None
    with place.main_first():  # rank 0 downloads the dataset, if it must, before the others read it
        # the model's shape is passed so that a dataset that does not fit it is refused up front
        dataset = make_dataset(spec.dataset, data_root, image_size=model.image_size, channels=model.in_channels)
        if spec.dataset != "folder":  # best.pt is judged on the test split, which a folder lacks
            test_split = make_dataset(spec.dataset, data_root, train=False, flip=False)
            holdout = torch.stack([test_split[i][0] for i in range(min(holdout_images, len(test_split)))])
    trainer = Trainer(model, spec.diffusion, spec.train, dataset, out, device,
                      extra={"profile": spec.profile, "dataset": spec.dataset, "run_key": spec.key},
                      holdout=holdout, place=place)
    return trainer.run(resume=resume, progress=progress, extra_hooks=extra_hooks)


def trained_checkpoint(spec: RunSpec, data_root: str | Path | None = None, device: str | torch.device = "cpu",
                       root: str | Path | None = None, progress: bool = False, extra_hooks: Sequence = ()) -> Path:
    """The path of `spec`'s finished last.pt: trained now if missing, completed if a previous
    run stopped early, returned at once if it is there. `extra_hooks` watch the training, if
    any (`Trainer.run`)."""
    out = run_dir(spec, root)
    last = out / "last.pt"
    if last.is_file() and load_checkpoint(last).metadata.get("step", 0) >= spec.train.steps:
        log.info("using the cached run %s", out)
        return last
    log.info("training %s into %s", spec.profile, out)
    train_run(spec, out, data_root, device, resume=last.is_file(), progress=progress, extra_hooks=extra_hooks)
    return last


def class_conditional(spec: RunSpec, label_dropout: float = 0.1) -> RunSpec:
    """`spec` made class-conditional and trained with label dropout, for classifier-free
    guidance: same model, schedule and budget, one label embedding more (Ho & Salimans 2022
    drop 10-20% of the labels)."""
    if spec.dataset not in SHAPES:
        raise ValueError(f"classifier-free guidance needs labelled data (mnist or cifar10), not {spec.dataset!r}")
    return replace(spec, model=replace(spec.model, num_classes=10),
                   train=replace(spec.train, label_dropout=label_dropout))
