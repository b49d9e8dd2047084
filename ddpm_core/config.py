"""Configuration as data: frozen dataclasses for each component, validated on creation.

This module owns the settings and their validation; it builds nothing. Change a field with
`dataclasses.replace(config, field=value)`, which validates again.
"""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self) -> None:
        check_choice(self.kind, ModelKind, "model kind")
        # Accept lists from JSON or the command line, store tuples so the config stays hashable.
        for name in ("channel_mults", "attention_resolutions"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_types(self)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}")
        if self.base_channels < 1 or self.num_res_blocks < 1 or not self.channel_mults:
            raise ValueError("base_channels, num_res_blocks and channel_mults must be positive")
        if self.base_channels % 32:
            # GroupNorm with 32 groups, as in the paper, needs channels divisible by 32.
            raise ValueError(f"base_channels must be a multiple of 32 (GroupNorm(32)), got {self.base_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {self.num_classes}")
        if self.kind == "unet":
            self._check_unet_shape()

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
)
