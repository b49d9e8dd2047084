"""Checkpoints: the weights together with the resolved configs, written atomically and read
safely.

This module owns the file format; it does not train or sample. A checkpoint alone is enough
to rebuild its model: the configs travel inside it, so no flag has to be repeated. Files are
read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ddpm_core.config import DiffusionConfig, ModelConfig, to_dict
from ddpm_core.denoisers import build_model

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

    def build_model(self, use_ema: bool = True) -> nn.Module:
        """The denoiser with the EMA weights (if any and `use_ema`), in eval mode."""
        model = build_model(self.model_config)
        state = self.ema_state if use_ema and self.ema_state is not None else self.model_state
        model.load_state_dict(state)
        return model.eval()


def atomic_save(payload: dict, path: str | Path) -> Path:
    """torch.save `payload` to `path` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over `path`. A crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_load(path: Path, file_format: str, how_to_make: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a dict written by `atomic_save` with `weights_only=True` and check its format
    marker; a clear error for a missing, truncated, foreign or code-running file."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: check the path, or {how_to_make}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable {file_format} file (truncated, corrupted, or a pickle that "
            f"would run code, which is refused): {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ValueError(f"{path} is a PyTorch file but not a {file_format} file (no '{file_format}' marker)")
    return payload


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
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer ddpm_core (format {payload['version']}); upgrade ddpm_core")
    return Checkpoint(
        model_config=ModelConfig(**payload["model_config"]),
        diffusion_config=DiffusionConfig(**payload["diffusion_config"]),
        model_state=payload["model_state"],
        ema_state=payload.get("ema_state"),
        metadata=payload.get("metadata") or {},
        train_state=payload.get("train_state"),
    )
