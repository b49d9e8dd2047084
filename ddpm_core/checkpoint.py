"""Checkpoints: the weights together with the resolved configs, written atomically and read
safely.

This module owns the file format; it does not train or sample. A checkpoint alone is enough
to rebuild its model: the configs travel inside it, so no flag has to be repeated. Files are
read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ddpm_core.config import DiffusionConfig, ModelConfig, to_dict
from ddpm_core.denoisers import build_model
from ddpm_core.files import atomic_path
from ddpm_core.objectives import as_eps_denoiser
from ddpm_core.schedule import NoiseSchedule

FORMAT = "ddpm_core.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint file holds. `ema_state`, when present, is what sampling uses."""

    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    metadata: dict = field(default_factory=dict)  # plain data: step, source, ...
    train_state: dict | None = None  # optimizer, scheduler, step, RNG states: what resuming needs

    def build_model(self, use_ema: bool = True, channels_last: bool = True) -> nn.Module:
        """The denoiser with the EMA weights (if any and `use_ema`), in eval mode.

        channels_last: its convolution weights stored channels-last (NHWC), the order oneDNN's
        CPU convolutions run fastest; their outputs, and so every activation, follow it. The
        values are the same to float32 rounding, and sampling on a CPU is about 1.2x faster
        (`benchmarks/bench_unet.py`: the laptop UNet's forward). Training is level either way
        there, so the trainer keeps the default order (`TrainConfig.channels_last`, CUDA only).
        A network that predicts x_0 or mu_tilde (`ModelConfig.prediction`) comes wrapped as the
        eps predictor the samplers take (`objectives.EpsFromPrediction`).
        """
        model = build_model(self.model_config)
        state = self.ema_state if use_ema and self.ema_state is not None else self.model_state
        model.load_state_dict(state)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return as_eps_denoiser(model, self.model_config, NoiseSchedule.from_config(self.diffusion_config)).eval()


def atomic_save(payload: dict, path: str | Path) -> Path:
    """torch.save `payload` to `path` atomically (`files.atomic_path`): a temporary file in the
    same folder, flushed to disk, then renamed over `path`. A crash mid-write, or a full disk,
    leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def first_line(error: BaseException | str) -> str:
    """An error (or its message) as one line: the first non-empty line, else the type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__ if isinstance(error, BaseException) else "no details"


def safe_load(path: Path, file_format: str, how_to_make: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a dict written by `atomic_save` with `weights_only=True` and check its format
    marker; a clear error for a missing, empty, truncated, foreign or code-running file."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: check the path, or {how_to_make}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a {file_format} file: {how_to_make}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, ...: unreadable, whatever the cause
        raise ValueError(
            f"{path} is not a readable {file_format} file (truncated, corrupted, or a pickle that "
            f"would run code, which is refused): {first_line(error)}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ValueError(f"{path} is a PyTorch file but not a {file_format} file (no '{file_format}' marker)")
    return payload


def stored_config(payload: dict, key: str, cls, path: Path):
    """The config `cls` stored under `key`; a one-line ValueError naming the file for a missing,
    foreign-shaped or invalid one (an edited file, another program's)."""
    stored = payload.get(key)
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: its {key} is {type(stored).__name__}, not a dict of settings; the file is "
                         f"damaged or edited: use the original, or train again")
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(stored) - known):
        raise ValueError(f"{path}: its {key} has settings this ddpm_core does not know: {', '.join(unknown)} "
                         f"(valid: {', '.join(sorted(known))}); upgrade ddpm_core or repair the file")
    try:
        return cls(**stored)
    except ValueError as error:
        raise ValueError(f"{path}: its {key} is invalid: {error}") from error


def check_state(state, model: nn.Module, path: Path, what: str = "weights", hint: str = "") -> None:
    """Refuse weights that are not a dict of tensors, do not fit `model` (names or shapes), or
    hold NaN / inf (which samples black images); each with one line naming the file."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: its {what} is not a dict of tensors; the file is damaged: use the original")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    lacking, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    misshapen = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    if lacking or extra or misshapen:
        detail = (f"missing {lacking[:3]}" if lacking else f"unexpected {extra[:3]}" if extra else
                  f"{misshapen[0]} is {tuple(state[misshapen[0]].shape)}, the model has {tuple(expected[misshapen[0]])}")
        raise ValueError(f"{path}: its {what} do not fit the model it describes{hint}: {detail}; the file is "
                         f"damaged or edited: use the original, or train again")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{path}: its {what} hold NaN or inf ({len(broken)} tensor(s), e.g. {broken[0]}): it would "
                         f"give black images; use an earlier checkpoint (best.pt, snapshots/) or train again")


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write `checkpoint` to `path` atomically (see `atomic_save`)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": to_dict(checkpoint.model_config),
        "diffusion_config": to_dict(checkpoint.diffusion_config),
        "model_state": checkpoint.model_state,
        "ema_state": checkpoint.ema_state,
        "metadata": checkpoint.metadata,
        "train_state": checkpoint.train_state,
    }
    return atomic_save(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; a clear ValueError for anything else."""
    path = Path(path)
    payload = safe_load(path, FORMAT, "train or import a model first", map_location)
    version = payload.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{path} was written by a newer ddpm_core (format {version!r}); upgrade ddpm_core")
    model_config = stored_config(payload, "model_config", ModelConfig, path)
    diffusion_config = stored_config(payload, "diffusion_config", DiffusionConfig, path)
    missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(payload["model_config"]))
    hint = f" (its model_config lacks {', '.join(missing)})" if missing else ""
    with torch.device("meta"):  # the names and shapes alone, no memory
        skeleton = build_model(model_config)
    check_state(payload.get("model_state"), skeleton, path, "model_state", hint)
    if payload.get("ema_state") is not None:
        check_state(payload["ema_state"], skeleton, path, "ema_state", hint)
    for key in ("metadata", "train_state"):
        if not isinstance(payload.get(key) or {}, dict):
            raise ValueError(f"{path}: its {key} is {type(payload[key]).__name__}, not a dict; the file is damaged")
    return Checkpoint(
        model_config=model_config,
        diffusion_config=diffusion_config,
        model_state=payload["model_state"],
        ema_state=payload.get("ema_state"),
        metadata=payload.get("metadata") or {},
        train_state=payload.get("train_state"),
    )
