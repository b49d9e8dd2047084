"""Named training profiles: model, diffusion, optimisation and dataset, chosen in one place.

This module owns the presets; override any field with `dataclasses.replace` (the command
line does this for --steps, --batch-size, --lr, --base-channels, --schedule, --attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_core.config import (
    CIFAR10_PAPER_MODEL, MNIST_SMALL_MODEL, ClassifierConfig, DatasetName, DiffusionConfig, ModelConfig, TrainConfig,
    replace,
)


@dataclass(frozen=True)
class Profile:
    name: str
    dataset: DatasetName
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    about: str
    classifier: ClassifierConfig = ClassifierConfig()  # the noise-aware classifier for guidance
    judged_samples: int = 500  # samples per guidance setting that the judge reads (notebook 04)
    fid_samples: int = 10_000  # samples per FID (notebook 05; the paper's protocol takes 50,000)


# 12-24-48 channels, 4 GroupNorm groups, attention only in the middle: 0.237 GFLOP per training
# image (forward + backward, `torch.utils.flop_counter`), a fifth of the 1.12 of the 32-64-64
# profile of issue 19, which buys more images (README: how the laptop profile was tuned). 0.36M
# parameters.
LAPTOP_MODEL = replace(MNIST_SMALL_MODEL, base_channels=12, channel_mults=(1, 2, 4), norm_groups=4,
                       attention_resolutions=())

PROFILES = {
    profile.name: profile
    for profile in (
        Profile(
            "smoke", "mnist",
            replace(MNIST_SMALL_MODEL, channel_mults=(1, 2), attention_resolutions=(14,)),
            DiffusionConfig("linear", 100),
            TrainConfig(steps=20, batch_size=8, lr=1e-3, warmup_steps=5, ema_decay=0.99, ema_warmup=True,
                        log_every=5, checkpoint_every=10, sample_every=10, sample_images=4, snapshot_every=5),
            "seconds on a CPU: exercises every stage, learns nothing (tests and CI)",
            ClassifierConfig(steps=10, batch_size=8), judged_samples=20, fid_samples=16,
        ),
        Profile(
            "laptop", "mnist", LAPTOP_MODEL, DiffusionConfig("linear", 1000),
            # 8,496 x 64 images x 0.237 GFLOP = 128.9 TFLOP of training, under the cap of issue 19 (the
            # 1.06M profile's 1,800 x 64 x 1.12). P2 weighting won a quarter-length screen; batch 64
            # and lr 2e-3 won full-length screens at this compute on a GPU; on the CPU 12-24-48 (8,496
            # steps) beat 16-32-32 (7,168) and 16-32-64 (4,790) at equal compute, both with EMA ramp
            # 10: DDPM-1000 FID 5.88 / 7.59 / 7.38 over two trainings against 7.78 / 9.60, DDIM-50 8.33
            # against 8.95 over five sampling seeds, in 28-29 minutes (README: the tables). The EMA is
            # its ramp, (1 + k) / (5 + k) (`ema_ramp`), up to its 0.9995 cap from update 7,995 on.
            # Ramp 5 beat ramp 10 on all six draws of two trainings, DDIM-50 7.42 / 7.94 against
            # 8.12 / 8.68 (benchmarks/ema_sweep.py); the profile with it: DDIM-50 7.42 and DDPM-1000
            # 7.47 over sampling seeds 0-2, in 28.8 minutes (README: rounds five and six). Drawing t by
            # the loss history (`timestep_sampling`, the same objective, about 1 ms a step) then took
            # DDIM-50 to 6.59 / 5.57 / 5.85 on the same three draws, mean 6.00, and the confident share
            # from 79.7% to 82.9% (README: round seven).
            TrainConfig(steps=8496, batch_size=64, lr=2e-3, lr_decay="cosine", warmup_steps=425, ema_decay=0.9995,
                        ema_warmup=True, ema_ramp=5.0, log_every=50, checkpoint_every=1200, sample_every=2400,
                        snapshot_every=1200, loss_weighting="p2", timestep_sampling="loss"),
            "MNIST on a 2-core CPU in about 30 minutes (README: how it was tuned)",
            # The down half of a UNet at 16-32-64 (0.18M), wider than LAPTOP_MODEL's own (the 16-32-32
            # model's own half, 0.08M, reached only 93.5% guided accuracy), t uniform: 4,000 steps of
            # 64 in 233-273 s on 2026-12-04's and 12-05's CPU, 98.5-99.5% guided accuracy at s = 5-40
            # (README: the classifier rows; 2,000 steps of 64 and 4,000 of 32 reached 93.5% and 95.5%
            # at best).
            ClassifierConfig(steps=4000, batch_size=64, lr=2e-3, channel_mults=(1, 2, 4), base_channels=16),
            judged_samples=100, fid_samples=100,
        ),
        Profile(
            "mnist-gpu", "mnist", replace(MNIST_SMALL_MODEL, base_channels=64, num_res_blocks=2, dropout=0.1),
            DiffusionConfig("linear", 1000),
            TrainConfig(steps=20_000, batch_size=128, lr=4e-4, warmup_steps=500, ema_decay=0.9995, ema_warmup=True,
                        log_every=100, checkpoint_every=2000, sample_every=2000, snapshot_every=2000,
                        num_workers=4),
            "MNIST to full quality on one GPU",
            ClassifierConfig(steps=5000, batch_size=256, lr=1e-3),  # not yet measured on a GPU
            fid_samples=1000,
        ),
        Profile(
            "cifar10-paper", "cifar10", CIFAR10_PAPER_MODEL, DiffusionConfig("linear", 1000),
            TrainConfig(num_workers=8, sample_every=10_000, sample_images=64, snapshot_every=50_000),
            "the paper's CIFAR-10 run: 35.7M UNet, batch 128, lr 2e-4, warmup 5000, EMA 0.9999, 800k steps",
            ClassifierConfig(steps=150_000, batch_size=256, lr=3e-4),  # not yet measured
        ),
    )
}


def default_profile(device: torch.device) -> str:
    """The profile a plain `train` runs: `mnist-gpu` on a CUDA GPU, `laptop` anywhere else."""
    return "mnist-gpu" if device.type == "cuda" else "laptop"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid choices: {', '.join(PROFILES)}")
    return PROFILES[name]
