"""Drawing images from a trained model: N of them, in batches, optionally guided towards classes.

This module owns the one road from a checkpoint (or a model and its schedule) to images that
the command line (`sample`, `evaluate`), the benchmarks and the notebooks all take. The
reverse process itself is `ddpm_core.sampling`'s, the guidance `ddpm_core.guidance`'s.

    for images in generate(load_checkpoint("runs/.../last.pt"), 64, SamplerConfig("ddim")):
        ...  # uint8 (B, C, H, W) on the CPU, as image files store them

One generator drives every batch, so a seed gives the same images for the same count, batch
size and sampler. Labels guide a class-conditional model classifier-free (`guidance_weight`
w: Ho & Salimans 2022) or an unconditional one through a noise-aware classifier
(`guidance_scale` s: Dhariwal & Nichol 2021).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ddpm_core.checkpoint import Checkpoint
from ddpm_core.classifier import NoisyClassifier, load_noisy_classifier
from ddpm_core.config import SamplerConfig, to_dict
from ddpm_core.diffusion import Denoiser
from ddpm_core.guidance import ClassifierFreeGuidance, classifier_guidance
from ddpm_core.plotting import to_uint8
from ddpm_core.runtime import make_generator, progress_bar
from ddpm_core.sampling import GuidanceFn, sample
from ddpm_core.schedule import NoiseSchedule


def default_batch_size(device: torch.device | str) -> int:
    """Images per sampler call when none is asked for: 256 on a GPU, 64 on a CPU (faster there)."""
    return 256 if torch.device(device).type == "cuda" else 64


def generate(source: Checkpoint | Denoiser, num_images: int, sampler: SamplerConfig = SamplerConfig(),
             labels: Sequence[int] | torch.Tensor | None = None, *, schedule: NoiseSchedule | None = None,
             classifier: NoisyClassifier | str | Path | None = None, guidance_scale: float = 1.0,
             guidance_weight: float | None = None, batch_size: int | None = None,
             generator: torch.Generator | None = None, seed: int = 0, device: torch.device | str | None = None,
             use_ema: bool = True, progress: bool = False) -> Iterator[torch.Tensor]:
    """`num_images` images from `source` as uint8 batches (B, C, H, W) on the CPU.

    source: a checkpoint (its EMA weights unless `use_ema=False`, and its schedule), or a
    model with its `schedule`. labels: the classes to draw, cycled over the images (e.g.
    `range(10)`); a class-conditional model is then guided with weight `guidance_weight`
    (None: plain conditional sampling), an unconditional one by `classifier` (a
    `NoisyClassifier`, or the path of one, checked against the checkpoint's diffusion) at
    `guidance_scale`. Without labels a class-conditional model samples unconditionally (its
    "no class" label). generator: drives every draw (default: seeded by `seed` on `device`).
    Bad combinations are refused at the call, before any image is drawn.
    """
    if num_images < 0 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"generate needs num_images >= 0 and batch_size >= 1 (or None: "
                         f"{default_batch_size('cpu')} on a CPU), got {num_images} and {batch_size}")
    if isinstance(source, ClassifierFreeGuidance):
        raise ValueError("pass the class-conditional model itself, with guidance_weight=w: generate wraps it "
                         "for classifier-free guidance")
    model, schedule, device = _model_and_schedule(source, schedule, device, use_ema)
    labels = _labels(labels, num_images)
    shape = _image_shape(model, source)
    model, classifier = _guided(model, source, labels, classifier, guidance_weight, device)
    if classifier is not None:
        classifier_guidance(classifier, labels, guidance_scale)  # refuses a bad scale now, not at the first batch
    if generator is None:
        generator = make_generator(seed, device)
    # everything above is checked now, at the call; the batches are drawn as they are asked for
    return _batches(model, schedule, shape, num_images, sampler, labels, classifier, guidance_scale,
                    batch_size or default_batch_size(device), generator, device, progress)


def _batches(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, int, int], num_images: int,
             sampler: SamplerConfig, labels: torch.Tensor | None, classifier: NoisyClassifier | None,
             guidance_scale: float, batch_size: int, generator: torch.Generator, device: torch.device,
             progress: bool) -> Iterator[torch.Tensor]:
    """`generate`'s loop: one `sample` call per batch, all from one generator."""
    with progress_bar(total=num_images, desc="samples", unit="img", disable=not progress) as bar:
        for first in range(0, num_images, batch_size):
            size = min(batch_size, num_images - first)
            y = labels[first: first + size].to(device) if labels is not None else None
            guidance: GuidanceFn | None = None
            if classifier is not None:
                guidance, y = classifier_guidance(classifier, y, guidance_scale), None  # the model takes no labels
            result = sample(model, schedule, (size, *shape), **to_dict(sampler), y=y, generator=generator,
                            device=device, guidance=guidance, progress=progress)
            bar.update(size)
            yield to_uint8(result.samples)


def _model_and_schedule(source: Checkpoint | Denoiser, schedule: NoiseSchedule | None,
                        device: torch.device | str | None, use_ema: bool) -> tuple[Denoiser, NoiseSchedule, torch.device]:
    """The model on its device and the schedule it was trained with."""
    if isinstance(source, Checkpoint):
        device = torch.device(device or "cpu")
        model = source.build_model(use_ema=use_ema).to(device)
        return model, schedule or NoiseSchedule.from_config(source.diffusion_config), device
    if schedule is None:
        raise ValueError("generate(model, ...) needs the model's schedule: pass schedule=NoiseSchedule(...), "
                         "or a checkpoint, which carries it")
    if device is None:
        device = next(iter(source.parameters())).device if isinstance(source, torch.nn.Module) else "cpu"
    return source, schedule, torch.device(device)


def _labels(labels: Sequence[int] | torch.Tensor | None, num_images: int) -> torch.Tensor | None:
    """The labels cycled over `num_images` images: (num_images,) long, or None."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    if len(labels) == 0:
        raise ValueError("labels is empty: name at least one class to draw, or pass labels=None")
    return labels.repeat(math.ceil(num_images / len(labels)))[:num_images]


def _guided(model: Denoiser, source, labels: torch.Tensor | None, classifier, guidance_weight: float | None,
            device: torch.device) -> tuple[Denoiser, NoisyClassifier | None]:
    """What draws the labels: the model wrapped for classifier-free guidance when it is
    class-conditional, else the noise-aware classifier; each combination that cannot work
    is refused with what to do instead."""
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if labels is None:
        if classifier is not None:
            raise ValueError("a classifier guides towards classes: name them (--classifier needs the classes to "
                             "draw: --class N [N ...])")
        return model, None
    if num_classes is not None:
        if classifier is not None:
            raise ValueError("this checkpoint is class-conditional: guide it with guidance_weight "
                             "(--guidance-weight), not a classifier")
        _check_labels(labels, num_classes)
        return (model if guidance_weight is None else ClassifierFreeGuidance(model, guidance_weight)), None
    if classifier is None:
        raise ValueError("this checkpoint is unconditional: drawing classes needs a noise-aware classifier "
                         "(--class needs --classifier PATH, from `python -m ddpm_core train-classifier`), "
                         "or sample a class-conditional checkpoint")
    if not isinstance(classifier, NoisyClassifier):
        classifier = load_guidance_classifier(Path(classifier), source, device)
    _check_labels(labels, classifier.num_classes)
    return model, classifier.to(device)


def load_guidance_classifier(path: str | Path, source: Checkpoint | Denoiser,
                             device: torch.device | str = "cpu") -> NoisyClassifier:
    """A noise-aware classifier file on `device`, refused when it was trained for another
    diffusion than the checkpoint `source`'s (what `generate` does with a classifier path;
    load it once with this to reuse it across calls)."""
    classifier, diffusion = load_noisy_classifier(path, device)
    if isinstance(source, Checkpoint) and diffusion != source.diffusion_config:
        raise ValueError(f"the classifier {path} was trained for {diffusion}, the checkpoint uses "
                         f"{source.diffusion_config}; train a classifier for this checkpoint's schedule")
    return classifier


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(f"the labels must be classes 0 to {num_classes - 1} (--class takes labels 0 to "
                         f"{num_classes - 1}), got {sorted(set(labels.tolist()))}")


def _image_shape(model: Denoiser, source) -> tuple[int, int, int]:
    """(C, H, W) of the images the model makes."""
    config = source.model_config if isinstance(source, Checkpoint) else getattr(model, "config", None)
    if config is None:
        raise ValueError("generate cannot tell the image shape of this model: pass a checkpoint, or a model with "
                         "a `config` (ModelConfig)")
    return config.in_channels, config.image_size, config.image_size
