"""A training run's state and files: what last.pt holds so that a resumed run continues exactly
(`TrainState`, written and read in one place), what a resumed run may change, and log.jsonl.

This module owns the checkpoint's `train_state` and the log's lines; the loop that changes
them is `ddpm_core.training`'s, the file format `ddpm_core.checkpoint`'s.

last.pt's train_state: step, best_heldout_loss, optimizer, scheduler, train_config,
world_size; torch_rng and cuda_rng (rank 0's global RNG, CPU and GPU: what it draws alone,
dropout masks and flips); shared_rng (the generator of the diffusion's draws, t, eps and label
dropout, in the same state on every rank); timestep_history (with timestep_sampling "loss",
the losses that draw t); and, from several processes, rank_rng (every
rank's global RNG, in rank order). A one-process last.pt from before shared_rng existed drew
the diffusion's draws from its global RNG, so it resumes with that state as the generator's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddpm_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, stored_config
from ddpm_core.config import DiffusionConfig, ModelConfig, TrainConfig, to_dict
from ddpm_core.diffusion import LossAwareTimesteps
from ddpm_core.distributed import Distributed
from ddpm_core.files import write_text

log = logging.getLogger(__name__)

# What a resumed run may change: how far it goes, how it is watched and how fast it runs.
# Every other setting decides the weights, so resuming with another value is refused.
RESUMABLE = ("steps", "log_every", "checkpoint_every", "sample_every", "sample_images", "snapshot_every",
             "num_workers", "compile", "fused_adam", "pin_memory")


def resume_conflicts(trained: TrainConfig, requested: TrainConfig) -> list[str]:
    """The settings, other than `RESUMABLE`'s, in which `requested` differs from the run's own,
    as "name trained -> requested" strings."""
    return [f"{name} {getattr(trained, name)!r} -> {getattr(requested, name)!r}"
            for name in TrainConfig.__dataclass_fields__
            if name not in RESUMABLE and getattr(trained, name) != getattr(requested, name)]


def rng_state(device: torch.device) -> dict:
    """This process's global RNG state: the CPU one, and its GPU's (None elsewhere)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


@dataclass
class TrainState:
    """Everything last.pt holds, so everything a resumed run restores: what the run is, and
    where it stands. `save` and `restore` are the only code that knows the file's fields."""

    # what the run is, fixed from its start
    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    config: TrainConfig
    place: Distributed
    metadata: dict  # plain data stored with the run (dataset name, profile, ...)
    # where it stands, changed by every step
    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the diffusion's draws for each global batch, alike on every rank
    timesteps: LossAwareTimesteps | None = None  # the loss history that draws t, when t is not uniform
    step: int = 0
    best_heldout_loss: float = math.inf
    saved_step: int | None = None  # the step last.pt holds now (written or read); not itself saved

    def save(self, path: Path) -> Path:
        """Write last.pt to `path`. Every rank calls it (their RNG states are gathered into the
        file); rank 0 writes."""
        rank_rng = self.place.gather(rng_state(self.generator.device))
        self.saved_step = self.step
        if not self.place.is_main:
            return path
        own = rank_rng[0]
        train_state = {
            "step": self.step,
            "best_heldout_loss": self.best_heldout_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": own["cpu"],
            "cuda_rng": [] if own["cuda"] is None else [own["cuda"]],
            "train_config": to_dict(self.config),
            "world_size": self.place.world_size,
            "shared_rng": self.generator.get_state(),
        }
        if self.place.enabled:
            train_state["rank_rng"] = rank_rng
        if self.timesteps is not None:
            train_state["timestep_history"] = self.timesteps.state_dict()
        checkpoint = Checkpoint(self.model_config, self.diffusion_config, self.model.state_dict(),
                                self.ema_model.state_dict(), {**self.metadata, "step": self.step}, train_state)
        return save_checkpoint(checkpoint, path)

    def save_weights(self, path: Path, **metadata) -> Path:
        """The EMA weights now, as a weights-only checkpoint (small: no optimizer): best.pt, snapshots."""
        ema_state = self.ema_model.state_dict()
        return save_checkpoint(Checkpoint(self.model_config, self.diffusion_config, ema_state, ema_state,
                                          {**self.metadata, "step": self.step, **metadata}), path)

    def restore(self, path: Path) -> None:
        """Continue from the last.pt at `path`. A one-line ValueError refuses one of another
        model or diffusion, with other settings (`resume_conflicts`), from another number of
        processes, without a training state, or with a damaged one."""
        checkpoint = load_checkpoint(path, map_location=self.generator.device)
        if (checkpoint.model_config, checkpoint.diffusion_config) != (self.model_config, self.diffusion_config):
            raise ValueError(
                f"{path} was trained with another configuration (checkpoint: {checkpoint.model_config}, "
                f"{checkpoint.diffusion_config}; requested: {self.model_config}, {self.diffusion_config}): "
                f"resume with the same profile and options, or write to a new --out folder"
            )
        if checkpoint.train_state is None:
            raise ValueError(f"{path} holds weights only (no optimizer state); it cannot be resumed")
        try:
            self._restore(checkpoint, path)
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as error:
            raise ValueError(f"{path}: its training state is damaged ({type(error).__name__}: {error}); "
                             f"resume from a copy, or start a new run") from error

    def _restore(self, checkpoint: Checkpoint, path: Path) -> None:
        state = checkpoint.train_state
        trained = stored_config(state, "train_config", TrainConfig, path)
        if conflicts := resume_conflicts(trained, self.config):
            raise ValueError(f"{path} was trained with other settings ({'; '.join(conflicts)}); a resumed run keeps "
                             f"them: drop those options, or train into a new --out")
        world_size = state.get("world_size", 1)
        if world_size != self.place.world_size:
            raise ValueError(f"{path} was trained by {world_size} process(es) and this run has "
                             f"{self.place.world_size}: resume with the same number (torchrun --nproc_per_node "
                             f"{world_size}; 1 is a plain `python -m ddpm_core train`)")
        self.model.load_state_dict(checkpoint.model_state)
        self.ema_model.load_state_dict(checkpoint.ema_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.timesteps is not None:
            self.timesteps.load_state_dict(state["timestep_history"])
        self.step = self.saved_step = state["step"]
        self.best_heldout_loss = state["best_heldout_loss"]
        device = self.generator.device
        own = state["rank_rng"][self.place.rank] if self.place.enabled else \
            {"cpu": state["torch_rng"], "cuda": state["cuda_rng"][0] if state["cuda_rng"] else None}
        torch.set_rng_state(own["cpu"].cpu())
        if own["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"].cpu(), device)
        shared = state["shared_rng"] if "shared_rng" in state or self.place.enabled else None
        if shared is None and not self.place.enabled:
            # a one-process file from before the generator existed: its global RNG drew the batch's
            # draws, so they continue from it; the global RNG then draws only what this process
            # draws alone (dropout, flips), seeded as a new run seeds it
            shared = own["cuda"] if device.type == "cuda" else own["cpu"]
            torch.manual_seed(self.config.seed + 1 + self.place.rank)
        if shared is None or shared.numel() != self.generator.get_state().numel():
            log.warning("%s was trained on another kind of device: the draws continue from a new stream, so this "
                        "run will not match one that never stopped", path)
        else:
            self.generator.set_state(shared.cpu())


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's log.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trim_log(path: Path, step: int) -> None:
    """Keep the lines of log.jsonl up to `step` (a resumed run writes the later ones again) and
    drop a half-written last line, so that a restart leaves neither duplicates nor bad JSON."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(f"{line}\n" for line in kept))


class RunLog:
    """out/log.jsonl, appended to line by line, with its records kept in memory (the loss
    curve is drawn from them). Opening it at `step` first trims the lines past that step
    (`trim_log`) and reads the rest, once. Only rank 0 keeps the log: elsewhere (`enabled`
    False) it writes and holds nothing."""

    def __init__(self, path: Path, step: int, enabled: bool = True):
        self.records: list[dict] = []
        self._file = None
        if enabled:
            trim_log(path, step)
            self.records = read_log(path) if path.is_file() else []
            self._file = path.open("a")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            self.records.append(record)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
