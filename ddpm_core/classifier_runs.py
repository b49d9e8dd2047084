"""The classifiers a run needs, trained once and found again: the noise-aware classifier that
guides its sampler, and the clean-MNIST judge that grades the samples.

This module owns training them from a dataset, what their files are called and where they
live (one naming rule each); the networks are `ddpm_core.classifier`'s and `ddpm_core.judge`'s,
the run folders `ddpm_core.runs`'.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ddpm_core.classifier import (
    NoisyClassifier, accuracy_by_timestep, classifier_model_config, save_noisy_classifier, train_noisy_classifier,
)
from ddpm_core.config import ClassifierConfig, DatasetName, DiffusionConfig, ModelConfig, RunSpec, key_fields, to_dict
from ddpm_core.data import make_dataset
from ddpm_core.judge import classifier_accuracy, save_digit_classifier, train_digit_classifier
from ddpm_core.profiles import get_profile
from ddpm_core.runs import run_dir, runs_root
from ddpm_core.schedule import NoiseSchedule

log = logging.getLogger(__name__)

EVAL_IMAGES = 1000  # noised test images behind a classifier's accuracy-by-t report


def classifier_path(folder: str | Path, config: ClassifierConfig, diffusion: DiffusionConfig) -> Path:
    """Where the noise-aware classifier trained with `config` for `diffusion` lives in a run
    folder: noisy_classifier-KEY.pt, KEY a hash of both, so other settings get another file."""
    text = json.dumps([key_fields(config), to_dict(diffusion)], sort_keys=True)
    return Path(folder) / f"noisy_classifier-{hashlib.sha256(text.encode()).hexdigest()[:8]}.pt"


def judge_path(root: str | Path | None = None) -> Path:
    """Where the clean-MNIST judge lives: mnist_judge.pt in the runs root (`runs.runs_root`)."""
    return runs_root(root) / "mnist_judge.pt"


def train_classifier(model_config: ModelConfig, diffusion: DiffusionConfig, dataset: DatasetName,
                     config: ClassifierConfig, out: str | Path, data_root: str | Path | None = None,
                     device: str | torch.device = "cpu", progress: bool = False,
                     eval_images: int = EVAL_IMAGES) -> dict:
    """Train a noise-aware classifier for a diffusion (`diffusion`'s schedule and T, the image
    shape of `model_config`) and write it to `out`. Returns its metadata: training time, final
    loss, and the accuracy on `eval_images` noised test images at 11 values of t. The initial
    weights come from `config.seed`, so equal settings give equal classifiers whatever drew
    from the global RNG before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        classifier = NoisyClassifier(classifier_model_config(model_config, config))
    shape = dict(image_size=model_config.image_size, channels=model_config.in_channels)
    schedule = NoiseSchedule.from_config(diffusion)
    start = time.perf_counter()
    losses = train_noisy_classifier(classifier, schedule, make_dataset(dataset, data_root, **shape), config,
                                    device, progress)
    metadata = {"steps": config.steps, "batch_size": config.batch_size, "seconds": round(time.perf_counter() - start, 1),
                "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    if eval_images:
        test = make_dataset(dataset, data_root, train=False, flip=False, **shape)
        n = min(eval_images, len(test))
        x0, y = torch.stack([test[i][0] for i in range(n)]), torch.tensor([test[i][1] for i in range(n)])
        timesteps = sorted({int(t) for t in torch.linspace(0, diffusion.num_timesteps - 1, 11).round()})
        accuracy = accuracy_by_timestep(classifier, schedule, x0, y, timesteps, torch.Generator(device).manual_seed(0))
        metadata["test_accuracy_by_t"] = {t: round(a, 4) for t, a in zip(timesteps, accuracy)}
    save_noisy_classifier(classifier.cpu(), diffusion, out, metadata)
    return metadata


def trained_classifier(spec: RunSpec, data_root: str | Path | None = None, device: str | torch.device = "cpu",
                       root: str | Path | None = None, progress: bool = False) -> Path:
    """The noise-aware classifier for `spec`'s diffusion (its schedule, T and image shape) in
    the run's folder, trained with the profile's `ClassifierConfig` now if missing."""
    config = get_profile(spec.profile).classifier
    path = classifier_path(run_dir(spec, root), config, spec.diffusion)
    if path.is_file():
        log.info("using the cached classifier %s", path)
        return path
    train_classifier(spec.model, spec.diffusion, spec.dataset, config, path, data_root, device, progress)
    return path


def trained_judge(data_root: str | Path | None = None, root: str | Path | None = None,
                  device: str | torch.device = "cpu", progress: bool = False) -> Path:
    """The clean-MNIST judge (`ddpm_core.judge`) at `judge_path(root)`, trained for one epoch
    now if missing, with its test accuracy in the file's metadata."""
    if root is not None and Path(root).suffix == ".pt":
        raise ValueError(f"trained_judge takes the runs folder (root), not a file: the judge is "
                         f"judge_path(root) = ROOT/mnist_judge.pt; got {root}")
    path = judge_path(root)
    if path.is_file():
        return path
    model = train_digit_classifier(make_dataset("mnist", data_root), epochs=1, device=device, progress=progress)
    accuracy = classifier_accuracy(model, make_dataset("mnist", data_root, train=False))
    return save_digit_classifier(model.cpu(), path, {"test_accuracy": accuracy})
