"""Training: Ho et al. 2020, Alg. 1 with what their code adds (warmup, gradient clipping, EMA),
checkpoints that survive a crash, and resumption that continues exactly where a run stopped.

This module owns the optimisation loop and its state; the loss is `ddpm_core.diffusion`'s
L_simple, the file format `ddpm_core.checkpoint`'s. Determinism: the batch order of each epoch
is a permutation seeded by (seed, epoch), and the torch RNG state (timesteps, noise, flips)
travels in every checkpoint, so on the CPU a resumed run computes the same weights as one
that never stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ddpm_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ddpm_core.config import DiffusionConfig, ModelConfig, check_choice, to_dict
from ddpm_core.denoisers import build_model
from ddpm_core.diffusion import loss_simple
from ddpm_core.monitor import heldout_loss, plot_loss_curve, write_sample_grid
from ddpm_core.schedule import NoiseSchedule

log = logging.getLogger(__name__)

LrDecay = Literal["constant", "cosine"]


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
    ema_warmup: bool = False  # decay_k = min(ema_decay, (1 + k) / (10 + k)): useful EMA early
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 5000  # also when the held-out loss is measured and best.pt kept
    sample_every: int = 0  # write out/samples/step_N.png every this many steps (0: never)
    sample_images: int = 16
    snapshot_every: int = 0  # keep the EMA weights as out/snapshots/step_N.pt (FID over training)
    amp: bool = True  # bfloat16 autocast, used on CUDA only
    compile: bool = False  # torch.compile the model (pays on long GPU runs)
    channels_last: bool = False  # CUDA only; slower on CPUs
    num_workers: int = 0
    label_dropout: float = 0.0  # class-conditional models: share of labels replaced by "no class"

    def __post_init__(self) -> None:
        check_choice(self.lr_decay, LrDecay, "lr_decay")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.sample_every < 0 or self.snapshot_every < 0:
            raise ValueError(f"sample_every and snapshot_every must be >= 0, got {self.sample_every}, "
                             f"{self.snapshot_every}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "sample_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive and warmup_steps non-negative")


def lr_factor(config: TrainConfig, k: int) -> float:
    """The learning rate of update k (0-based) as a fraction of config.lr.

    Linear warmup over `warmup_steps`, then constant, or a half cosine from 1 at the end of
    warmup down to 0 at `steps` (short fixed budgets end on better weights when lr decays).
    """
    if k < config.warmup_steps:
        return (k + 1) / config.warmup_steps
    if config.lr_decay == "constant":
        return 1.0
    progress = min(1.0, (k - config.warmup_steps) / max(config.steps - config.warmup_steps, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's weights: ema <- d * ema + (1 - d) * weights."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, step: int) -> float:
        """The decay for update number `step` (0-based); 0 at the first update, so the average
        starts at the weights themselves rather than at the random initialisation."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return 0.0 if step == 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def epoch_batches(num_items: int, batch_size: int, seed: int, start_step: int) -> Iterator[list[int]]:
    """Index batches forever: epoch e is the permutation seeded by seed + e, cut into full
    batches. Starting at `start_step` skips exactly the batches already trained on."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {num_items} images, fewer than one batch of {batch_size}")
    epoch, position = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(position, per_epoch):
            yield order[i * batch_size : (i + 1) * batch_size]
        epoch, position = epoch + 1, 0


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int
    final_loss: float
    images_per_s: float
    seconds: float
    checkpoint: Path


class Trainer:
    """Trains `model_config` on `dataset` and writes checkpoints and a JSONL log into `out`.

    out/last.pt is rewritten atomically every `checkpoint_every` steps and at the end; resume
    with `Trainer(...).run(resume=True)`. out/log.jsonl holds one line per `log_every` steps:
    step, loss (mean since the last line), lr, images/s, elapsed seconds; and one per
    checkpoint with the held-out loss. With `holdout` images (B, C, H, W), out/best.pt keeps
    the weights of lowest held-out loss (see `monitor.heldout_loss`). out/loss.png is the
    loss curve; out/samples/ holds sample grids when `sample_every` is set.
    """

    def __init__(self, model_config: ModelConfig, diffusion_config: DiffusionConfig, train_config: TrainConfig,
                 dataset: Dataset, out: str | Path, device: torch.device | str = "cpu", extra: dict | None = None,
                 holdout: torch.Tensor | None = None):
        self.model_config, self.diffusion_config, self.config = model_config, diffusion_config, train_config
        self.dataset, self.out, self.device = dataset, Path(out), torch.device(device)
        self.extra = extra or {}  # plain data stored with the run (dataset name, profile, ...)
        torch.manual_seed(train_config.seed)
        self.model = build_model(model_config).to(self.device)
        if train_config.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, train_config.ema_decay, train_config.ema_warmup)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_config.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(train_config, k))
        self.schedule = NoiseSchedule.from_config(diffusion_config).to(self.device)
        self.holdout = holdout.to(self.device) if holdout is not None else None
        self.best_heldout_loss = math.inf
        self.step = 0
        self._saved_step: int | None = None  # the step of the last checkpoint written or read
        self.forward = torch.compile(self.model) if train_config.compile else self.model

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.pt"

    def checkpoint(self, log_file) -> None:
        """Measure the held-out loss (keeping best.pt), save last.pt, redraw the loss curve."""
        if self.holdout is not None:
            value = heldout_loss(self.ema.model, self.schedule, self.holdout, seed=self.config.seed)
            is_best = value < self.best_heldout_loss
            if is_best:
                self.best_heldout_loss = value
                self.save_ema(self.out / "best.pt", heldout_loss=value)
            log_file.write(json.dumps({"step": self.step, "heldout_loss": value, "best": is_best}) + "\n")
            log_file.flush()
        self.save()
        self._saved_step = self.step
        plot_loss_curve(read_log(self.out / "log.jsonl")).savefig(self.out / "loss.png", dpi=100)

    def save(self) -> Path:
        train_state = {
            "step": self.step,
            "best_heldout_loss": self.best_heldout_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "train_config": to_dict(self.config),
        }
        checkpoint = Checkpoint(self.model_config, self.diffusion_config, self.model.state_dict(),
                                self.ema.model.state_dict(), metadata={**self.extra, "step": self.step},
                                train_state=train_state)
        return save_checkpoint(checkpoint, self.checkpoint_path)

    def save_ema(self, path: Path, **metadata) -> Path:
        """The EMA weights now, as a weights-only checkpoint (small: no optimizer): best.pt, snapshots."""
        ema_state = self.ema.model.state_dict()
        return save_checkpoint(Checkpoint(self.model_config, self.diffusion_config, ema_state, ema_state,
                                          metadata={**self.extra, "step": self.step, **metadata}), path)

    def load(self, path: Path) -> None:
        checkpoint = load_checkpoint(path, map_location=self.device)
        if (checkpoint.model_config, checkpoint.diffusion_config) != (self.model_config, self.diffusion_config):
            raise ValueError(
                f"{path} was trained with another configuration:\n  checkpoint: {checkpoint.model_config}, "
                f"{checkpoint.diffusion_config}\n  requested:  {self.model_config}, {self.diffusion_config}\n"
                f"resume with the same profile and options, or write to a new --out folder"
            )
        if checkpoint.train_state is None:
            raise ValueError(f"{path} holds weights only (no optimizer state); it cannot be resumed")
        self.model.load_state_dict(checkpoint.model_state)
        self.ema.model.load_state_dict(checkpoint.ema_state)
        state = checkpoint.train_state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.best_heldout_loss = state["best_heldout_loss"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    # -- the loop ---------------------------------------------------------------------------
    def train_step(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """One step of Alg. 1 plus warmup, clipping and the EMA update. Returns the loss."""
        autocast = self.config.amp and self.device.type == "cuda"
        if y is not None and self.config.label_dropout > 0:
            # Ho & Salimans 2022, Alg. 1: train the unconditional model jointly, as the "null"
            # label (index num_classes), so that classifier-free guidance can mix the two.
            drop = torch.rand(y.shape, device=y.device) < self.config.label_dropout
            y = torch.where(drop, torch.full_like(y, self.model_config.num_classes), y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_simple(self.forward, self.schedule, x0, y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step + 1}; stopped. The last good checkpoint "
                f"({self.checkpoint_path}, step {self._saved_step}) is kept. Try a lower --lr or turning off amp."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return loss.detach()

    def run(self, resume: bool = False, progress: bool = False) -> TrainResult:
        """Train until `config.steps`; with `resume`, continue from out/last.pt first."""
        if resume:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path} to continue from")
            self.load(self.checkpoint_path)
        elif self.checkpoint_path.exists():
            raise FileExistsError(
                f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self._saved_step = self.step if resume else None
        first_step = self.step
        conditional = self.model_config.num_classes is not None
        # The loader gets its own generator so that creating it draws nothing from the global
        # RNG, whose state the checkpoints carry; with num_workers = 0 a resumed run is exact.
        loader = DataLoader(self.dataset, batch_sampler=epoch_batches(len(self.dataset), self.config.batch_size,
                            self.config.seed, self.step), num_workers=self.config.num_workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        batches = iter(loader)
        self.model.train()
        start, window_start, window_losses, loss = time.perf_counter(), time.perf_counter(), [], torch.tensor(math.nan)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="training", disable=not progress)
        with (self.out / "log.jsonl").open("a") as log_file:
            while self.step < self.config.steps:  # fetch only batches that will be trained on
                x0, y = next(batches)
                x0 = x0.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True) if conditional else None
                loss = self.train_step(x0, y)
                window_losses.append(loss)
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    now = time.perf_counter()
                    record = {
                        "step": self.step, "loss": torch.stack(window_losses).mean().item(),
                        "lr": self.scheduler.get_last_lr()[0],
                        "images_per_s": len(window_losses) * self.config.batch_size / (now - window_start),
                        "elapsed_s": now - start,
                    }
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                    window_start, window_losses = now, []
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                    self.checkpoint(log_file)
                if self.config.snapshot_every and self.step % self.config.snapshot_every == 0:
                    self.save_ema(self.out / "snapshots" / f"step_{self.step:07d}.pt")
                if self.config.sample_every and self.step % self.config.sample_every == 0:
                    shape = (self.config.sample_images, self.model_config.in_channels, *[self.model_config.image_size] * 2)
                    write_sample_grid(self.ema.model, self.schedule, shape,
                                      self.out / "samples" / f"step_{self.step:07d}.png", seed=self.config.seed)
                bar.update(1)
        bar.close()
        path = self.checkpoint_path
        seconds = time.perf_counter() - start
        images = self.config.batch_size * (self.step - first_step)
        return TrainResult(self.step, loss.item(), images / seconds, seconds, path)


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's log.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

