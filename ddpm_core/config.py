"""Configuration as data: frozen dataclasses for each component, validated on creation.

This module owns the settings and their validation; it builds nothing. Change a field with
`dataclasses.replace(config, field=value)`, which validates again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

ScheduleName = Literal["linear", "cosine"]
ModelKind = Literal["unet", "cnn", "resnet"]
VarianceName = Literal["fixedlarge", "fixedsmall"]
SamplerName = Literal["ddpm", "ddim"]
SpacingName = Literal["uniform", "quadratic"]
MetricName = Literal["inception", "mnist"]  # FID features: InceptionV3, or the MNIST judge
DatasetName = Literal["mnist", "cifar10", "folder"]
LrDecay = Literal["constant", "cosine"]
LossWeighting = Literal["uniform", "min_snr", "p2"]
TimestepSampling = Literal["uniform", "loss"]  # how training draws t (`diffusion.LossAwareTimesteps`)
Prediction = Literal["eps", "mu", "x0"]  # what the network outputs (Ho et al. 2020, Table 2)
Objective = Literal["simple", "vlb"]  # the unweighted MSE of that output, or the true bound L


def check_choice(value: str, literal_type, what: str) -> None:
    """Raise a ValueError naming the valid choices when `value` is not one of `literal_type`."""
    choices = get_args(literal_type)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def _fits(value, kind) -> bool:
    """Whether `value` is of the annotated type `kind` (int, float, bool, str, Literal, tuple[int, ...],
    X | None). bool is not an int here, floats must be finite, and a float field takes an int."""
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in get_args(kind))
    if origin is Literal:
        return value in get_args(kind)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(item, get_args(kind)[0]) for item in value)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def check_types(config) -> None:
    """Raise a ValueError naming the field, its value and the type expected when a field of the
    dataclass `config` holds something else: a string where a number belongs (an edited
    checkpoint), NaN or inf for a rate, a bool for a count. Called first by each config's
    __post_init__ (after lists from JSON became tuples), so the range checks compare numbers."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), hints[field.name]
        if not _fits(value, kind):
            shown = getattr(kind, "__name__", None) if get_origin(kind) is None else None
            expected = shown or str(kind).replace("typing.", "")
            if isinstance(value, float) and not math.isfinite(value):
                expected = "a finite number"
            raise ValueError(f"{type(config).__name__}.{field.name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process: which beta schedule, over how many steps.

    `num_timesteps` is the paper's T. Timesteps are 0-indexed everywhere in this project:
    index t is the paper's step t + 1, so index 0 is the first (least noisy) step and index
    T - 1 the last.
    """

    schedule: ScheduleName = "linear"
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        check_choice(self.schedule, ScheduleName, "schedule")
        check_types(self)
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps (T) must be at least 2, got {self.num_timesteps}")


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser eps_theta(x_t, t): its kind, size and input shape.

    `attention_resolutions` are in pixels (16 means "at the 16x16 feature maps"), as in
    Ho et al.'s code. `attention=False` removes every attention layer, the middle one too.
    `channel_mults` gives one level per entry; each level but the last halves the image,
    so `image_size` must divide by 2 ** (len(channel_mults) - 1).
    The "cnn" and "resnet" kinds use `base_channels`, `num_res_blocks` (their depth) and
    `dropout`, and ignore the UNet-only fields.
    """

    kind: ModelKind = "unet"
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention: bool = True
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int | None = None
    # GroupNorm's groups: 32 in the paper. Each group must hold two channels or more, or the
    # norm subtracts the per-channel timestep shift again; narrow networks take fewer groups.
    norm_groups: int = 32
    # What the network outputs (`ddpm_core.objectives`): "eps" (the paper's model), "mu" (the
    # posterior mean mu_tilde) or "x0". The samplers see every one of them as an eps predictor.
    prediction: Prediction = "eps"

    def __post_init__(self) -> None:
        check_choice(self.kind, ModelKind, "model kind")
        check_choice(self.prediction, Prediction, "prediction")
        # Accept lists from JSON or the command line, store tuples so the config stays hashable.
        for name in ("channel_mults", "attention_resolutions"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_types(self)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}")
        if self.base_channels < 1 or self.num_res_blocks < 1 or not self.channel_mults:
            raise ValueError("base_channels, num_res_blocks and channel_mults must be positive")
        self._check_norm_groups()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {self.num_classes}")
        if self.kind == "unet":
            self._check_unet_shape()

    def _check_norm_groups(self) -> None:
        widths = sorted({self.base_channels * m for m in self.channel_mults} if self.kind == "unet"
                        else {self.base_channels})
        if self.norm_groups < 1 or any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width {widths} must divide into norm_groups={self.norm_groups} GroupNorm "
                             f"groups; choose base_channels and norm_groups to fit (the paper: 32 groups)")
        if widths[0] < 2 * self.norm_groups:
            raise ValueError(f"norm_groups={self.norm_groups} over {widths[0]} channels puts fewer than 2 channels in "
                             f"a group, which subtracts the timestep embedding again; use norm_groups <= "
                             f"{widths[0] // 2} (the MNIST profiles: 4 groups at 16 channels, 8 at 32)")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side length at each UNet level, e.g. (32, 16, 8, 4)."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mults)))

    def _check_unet_shape(self) -> None:
        halvings = len(self.channel_mults) - 1
        if self.image_size % 2**halvings:
            raise ValueError(
                f"image_size {self.image_size} cannot be halved {halvings} times "
                f"(channel_mults has {len(self.channel_mults)} levels); use an image size "
                f"divisible by {2**halvings}, or fewer levels"
            )
        if self.attention:
            missing = [r for r in self.attention_resolutions if r not in self.resolutions]
            if missing:
                raise ValueError(
                    f"attention_resolutions {missing} never occur in this UNet; "
                    f"valid choices: {', '.join(map(str, self.resolutions))} (pixels)"
                )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the paper's CIFAR-10 run (Appendix B and code)."""

    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000  # linear warmup of the learning rate (authors' code)
    lr_decay: LrDecay = "constant"  # after warmup: constant (the paper) or cosine to 0 at `steps`
    grad_clip: float = 1.0  # gradient-norm clipping (authors' code)
    ema_decay: float = 0.9999
    # With ema_warmup, decay_k = min(ema_decay, (1 + k) / (ema_ramp + k)): useful EMA early. The
    # ramp is a half-life of about ln 2 / (ema_ramp - 1) of the steps seen (7.7% at 10), and it
    # reaches ema_decay only at k = (ema_ramp * ema_decay - 1) / (1 - ema_decay): for 0.9995, 17,990
    # at ramp 10 and 7,995 at ramp 5, so in a run shorter than that the ramp, not ema_decay, is the average.
    ema_warmup: bool = False
    ema_ramp: float = 10.0
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 5000  # also when the held-out loss is measured and best.pt kept
    sample_every: int = 0  # write out/samples/step_N.png every this many steps (0: never)
    sample_images: int = 16
    snapshot_every: int = 0  # keep the EMA weights as out/snapshots/step_N.pt (FID over training)
    amp: bool = True  # bfloat16 autocast, used on CUDA only
    compile: bool = False  # torch.compile the model (pays on long GPU runs)
    channels_last: bool = False  # CUDA only: level on a CPU in training (the samplers there use it: Checkpoint.build_model)
    fused_adam: bool = True  # AdamW's fused CUDA kernel (CUDA only)
    pin_memory: bool = True  # page-locked batches copied without blocking (CUDA only)
    num_workers: int = 0
    label_dropout: float = 0.0  # class-conditional models: share of labels replaced by "no class"
    # The eps-MSE's weight per timestep (`diffusion.timestep_weights`): "uniform" is L_simple
    # (the paper); "min_snr" is min(SNR_t, min_snr_gamma) / SNR_t (Hang et al. 2023); "p2" is
    # 1 / (1 + SNR_t) ** p2_gamma (Choi et al. 2022). The samplers are the same for all three.
    loss_weighting: LossWeighting = "uniform"
    min_snr_gamma: float = 5.0
    p2_gamma: float = 1.0
    # How t is drawn: "uniform" (the paper, Alg. 1), or "loss": importance sampling by the last
    # ten losses at each t, each reweighted so that the objective is unchanged (Nichol &
    # Dhariwal 2021, Sec. 3.3; `diffusion.LossAwareTimesteps`). Only the estimator's variance changes.
    timestep_sampling: TimestepSampling = "uniform"
    # "simple": the unweighted MSE of the network's output (L_simple for eps); "vlb": the true
    # variational bound L with fixed isotropic Sigma (Ho et al. 2020, Table 2; `objectives`).
    objective: Objective = "simple"

    def __post_init__(self) -> None:
        check_choice(self.lr_decay, LrDecay, "lr_decay")
        check_choice(self.objective, Objective, "objective")
        check_choice(self.loss_weighting, LossWeighting, "loss_weighting")
        check_choice(self.timestep_sampling, TimestepSampling, "timestep_sampling")
        check_types(self)
        if not (self.min_snr_gamma > 0 and self.p2_gamma >= 0):
            raise ValueError(f"min_snr_gamma must be positive and p2_gamma non-negative, got {self.min_snr_gamma} "
                             f"and {self.p2_gamma}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.sample_every < 0 or self.snapshot_every < 0:
            raise ValueError(f"sample_every and snapshot_every must be >= 0, got {self.sample_every}, "
                             f"{self.snapshot_every}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "sample_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.ema_ramp > 1.0:
            raise ValueError(f"ema_ramp must be greater than 1 (decay_k = (1 + k) / (ema_ramp + k)), "
                             f"got {self.ema_ramp}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive and warmup_steps non-negative")


@dataclass(frozen=True)
class ClassifierConfig:
    """How the noise-aware classifier is trained (AdamW, lr and weight decay as in
    guided-diffusion's classifier_train.py, cosine decay over a short budget)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    # The classifier's levels (channel multipliers of its base width) and that base width;
    # None: the diffusion model's. A thin denoiser can be paired with a classifier that keeps
    # more width (`laptop`: README, the classifier rows).
    channel_mults: tuple[int, ...] | None = None
    base_channels: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.channel_mults, list):  # from JSON or the command line
            object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        check_types(self)
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("steps, batch_size and lr must be positive and weight_decay non-negative")
        if self.channel_mults is not None and (not self.channel_mults or min(self.channel_mults) < 1):
            raise ValueError(f"channel_mults must be positive integers, one a level (or None: the model's), "
                             f"got {self.channel_mults}")
        if self.base_channels is not None and self.base_channels < 1:
            raise ValueError(f"base_channels must be a positive integer (or None: the model's), "
                             f"got {self.base_channels}")


DDIM_STEPS = 50  # S when a DDIM sampler is asked for without a number of steps


@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn from a trained model: the sampler and its settings.

    "ddpm" takes all T steps of Ho et al. 2020, Alg. 2 with `variance`; "ddim" takes S =
    `num_steps` steps (None: `DDIM_STEPS`) of Song et al. 2021 with `eta` and `spacing`.
    """

    sampler: SamplerName = "ddpm"
    num_steps: int | None = None  # DDIM's S; DDPM always takes all T
    variance: VarianceName = "fixedlarge"  # DDPM: sigma_t^2 = beta_t (the paper's CIFAR-10 choice) or beta_tilde_t
    eta: float = 0.0  # DDIM: 0 deterministic, 1 DDPM-like
    spacing: SpacingName = "uniform"  # DDIM: which S of the T steps
    clip_denoised: bool = True  # clip the predicted x0 to [-1, 1]
    amp: bool = False  # bfloat16 autocast for the model (GPUs); the step arithmetic stays float32

    def __post_init__(self) -> None:
        for value, kind, what in ((self.sampler, SamplerName, "sampler"), (self.variance, VarianceName, "variance"),
                                  (self.spacing, SpacingName, "spacing")):
            check_choice(value, kind, what)
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0 (0: deterministic, 1: DDPM-like), got {self.eta}")
        check_types(self)
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1 (or None: {DDIM_STEPS} for DDIM), got {self.num_steps}")

    def steps(self, num_timesteps: int) -> int:
        """How many model evaluations one sample takes with a T = `num_timesteps` diffusion."""
        if self.sampler == "ddpm":
            return num_timesteps
        return DDIM_STEPS if self.num_steps is None else self.num_steps


# TrainConfig fields that change how a run is watched or how fast it goes, never its weights
# (on the CPU), so they stay out of a run's key.
_NOT_IN_KEY = ("log_every", "checkpoint_every", "sample_every", "sample_images", "snapshot_every", "num_workers",
               "compile", "fused_adam", "pin_memory")
# Fields added after runs (and classifiers) were cached: left out of the key at their default,
# so that those files keep their names. ("channel_mults" and "base_channels" at None are
# ClassifierConfig's, when the classifier takes the model's; ModelConfig's are never None, so
# they are always kept.)
_KEY_ONLY_IF_SET = {"label_dropout": 0.0, "loss_weighting": "uniform", "min_snr_gamma": 5.0, "p2_gamma": 1.0,
                    "norm_groups": 32, "prediction": "eps", "objective": "simple", "channel_mults": None,
                    "base_channels": None, "ema_ramp": 10.0, "timestep_sampling": "uniform"}


def key_fields(config) -> dict:
    """The fields of `config` that go into a cache key (a run's folder, a classifier's file)."""
    return {k: v for k, v in to_dict(config).items()
            if k not in _NOT_IN_KEY and (k not in _KEY_ONLY_IF_SET or v != _KEY_ONLY_IF_SET[k])}


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
        text = json.dumps([self.dataset, key_fields(self.model), to_dict(self.diffusion), key_fields(self.train)],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def replace(config, **changes):
    """`dataclasses.replace`, re-exported so callers need one import for configs."""
    return dataclasses.replace(config, **changes)


def to_dict(config) -> dict:
    """Plain-data form of a config (for checkpoints and logs)."""
    return dataclasses.asdict(config)


# Ho et al. 2020, Appendix B: the CIFAR-10 model (35.7M parameters).
CIFAR10_PAPER_MODEL = ModelConfig()

# A laptop-sized MNIST UNet (28 -> 14 -> 7, 2.73M parameters). Its width grows where the
# maps are small (32, 64, 128 channels) with one block per level, so it has more parameters
# than diffusers' (32, 64, 64) x 2-block UNet (1.62M) yet trains faster on a CPU, where the
# 28x28 convolutions dominate: benchmarks/bench_unet.py measures both. No dropout: short
# CPU runs underfit rather than overfit.
MNIST_SMALL_MODEL = ModelConfig(
    image_size=28,
    in_channels=1,
    base_channels=32,
    channel_mults=(1, 2, 4),
    num_res_blocks=1,
    attention_resolutions=(7,),
    dropout=0.0,
    norm_groups=8,  # 4 channels per group at 32: GroupNorm(32) there would erase t (ModelConfig)
)
