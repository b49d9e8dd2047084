"""Training runs on disk: a profile with its overrides resolved into one configuration, and
one folder per configuration, so that the command line and every notebook train it once and
find it again.

This module owns the resolution of a run's settings and where its files live; the
optimisation loop is `ddpm_core.training`'s, the file format `ddpm_core.checkpoint`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import DiffusionConfig, ModelConfig, check_choice, replace, to_dict
from ddpm_core.data import SHAPES, DatasetName, make_dataset
from ddpm_core.profiles import PROFILES, default_profile, get_profile
from ddpm_core.runtime import resolve_device
from ddpm_core.training import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

# Fields that change how a run is watched or how fast it goes, never its weights (on the CPU).
_NOT_IN_KEY = ("log_every", "checkpoint_every", "sample_every", "sample_images", "num_workers", "compile")


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's weights: the profile it came from, resolved."""

    profile: str
    dataset: DatasetName
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig

    @property
    def key(self) -> str:
        """12 hex digits of a hash of the resolved configs: equal settings, equal key."""
        train = {k: v for k, v in to_dict(self.train).items() if k not in _NOT_IN_KEY}
        text = json.dumps([self.dataset, to_dict(self.model), to_dict(self.diffusion), train], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_run(profile: str, dataset: DatasetName | None = None, schedule: str | None = None,
                attention: bool | None = None, base_channels: int | None = None, **train_overrides) -> RunSpec:
    """A profile with overrides applied; None means "the profile's value". Unknown names and
    bad values raise ValueError listing the valid choices."""
    base = get_profile(profile)
    model = base.model
    if base_channels is not None:
        model = replace(model, base_channels=base_channels)
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


def resolve_notebook(profile: str, dataset: DatasetName | None, schedule: str | None, attention: bool | None,
                     device: str) -> tuple[RunSpec, torch.device]:
    """The notebooks' setup: check the parameters and resolve them. "auto" picks the device
    (CUDA, MPS, CPU) and then the profile (mnist-gpu on CUDA, laptop elsewhere)."""
    resolved_device = resolve_device(device)
    name = default_profile(resolved_device) if profile == "auto" else profile
    spec = resolve_run(name, dataset=dataset, schedule=schedule, attention=attention)
    return spec, resolved_device


def runs_root(root: str | Path | None = None) -> Path:
    """Where cached runs live: `root`, else $DDPM_RUNS_ROOT, else ./runs (ignored by git)."""
    return Path(root or os.environ.get("DDPM_RUNS_ROOT") or "runs")


def run_dir(spec: RunSpec, root: str | Path | None = None) -> Path:
    return runs_root(root) / f"{spec.profile}-{spec.dataset}-{spec.key}"


def train_run(spec: RunSpec, out: str | Path, data_root: str | Path | None = None,
              device: str | torch.device = "cpu", resume: bool = False, progress: bool = False,
              holdout_images: int = 128) -> TrainResult:
    """Train `spec` into `out` (resuming from out/last.pt with `resume`)."""
    model = spec.model
    # the model's shape is passed so that a dataset that does not fit it is refused up front
    dataset = make_dataset(spec.dataset, data_root, image_size=model.image_size, channels=model.in_channels)
    holdout = None
    if spec.dataset != "folder":  # best.pt is judged on the test split, which a folder lacks
        test_split = make_dataset(spec.dataset, data_root, train=False, flip=False)
        holdout = torch.stack([test_split[i][0] for i in range(min(holdout_images, len(test_split)))])
    trainer = Trainer(model, spec.diffusion, spec.train, dataset, out, device,
                      extra={"profile": spec.profile, "dataset": spec.dataset, "run_key": spec.key},
                      holdout=holdout)
    return trainer.run(resume=resume, progress=progress)


def trained_checkpoint(spec: RunSpec, data_root: str | Path | None = None, device: str | torch.device = "cpu",
                       root: str | Path | None = None, progress: bool = False) -> Path:
    """The path of `spec`'s finished last.pt: trained now if missing, completed if a previous
    run stopped early, returned at once if it is there."""
    out = run_dir(spec, root)
    last = out / "last.pt"
    if last.is_file() and load_checkpoint(last).metadata.get("step", 0) >= spec.train.steps:
        log.info("using the cached run %s", out)
        return last
    log.info("training %s into %s", spec.profile, out)
    train_run(spec, out, data_root, device, resume=last.is_file(), progress=progress)
    return last
