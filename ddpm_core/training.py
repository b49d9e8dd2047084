"""Training: Ho et al. 2020, Alg. 1 with what their code adds (warmup, gradient clipping, EMA),
in one process or in several under torchrun (DistributedDataParallel).

This module owns the optimisation loop; the loss is `ddpm_core.diffusion`'s L_simple (or another
of Table 2's objectives, `ddpm_core.objectives`), what a
checkpoint holds and how a run resumes `ddpm_core.train_state`'s, what the run logs and draws
along the way `ddpm_core.monitor`'s hooks, the process group `ddpm_core.distributed`'s.
Determinism: the batch order of each epoch is a permutation seeded by (seed, epoch), and the
random streams (the diffusion's draws, each rank's own) travel in every checkpoint, so on the
CPU a resumed run computes the same weights as one that never stopped.

Several processes: `batch_size` is the global batch; torch's DistributedSampler gives rank r
the items r, r + W, ... of each epoch's permutation, so the W shares of a step together are
the single-process batch. The diffusion's draws for that batch (t, eps, label dropout) come
from one generator that every rank holds in the same state, each rank taking its rows, so W
processes compute the update one process computes on the global batch (the gloo test checks
it). What a rank draws alone (dropout masks, flips) comes from its own seed, seed + 1 + rank.
One process is the case W = 1.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # the type; bars come from runtime.progress_bar

from ddpm_core.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_core.denoisers import build_model
from ddpm_core.diffusion import LossAwareTimesteps, sample_timesteps, timestep_weights
from ddpm_core.distributed import Distributed, epoch_batches, local_batch_size
from ddpm_core.files import folder_lock, remove_orphans
from ddpm_core.objectives import as_eps_denoiser, training_loss
from ddpm_core.monitor import Checkpointing, LogWindow, SampleGrids, Snapshots
from ddpm_core.runtime import progress_bar, stop_requests
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.train_state import RESUMABLE, RunLog, TrainState, read_log, resume_conflicts

# Imported from here by the command line, the runs and the notebooks (some defined elsewhere).
__all__ = ["EMA", "RESUMABLE", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted",
           "epoch_batches", "lr_factor", "read_log", "resume_conflicts"]


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

    def __init__(self, model: nn.Module, decay: float, warmup: bool, ramp: float = 10.0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.ramp = decay, warmup, ramp

    def decay_at(self, step: int) -> float:
        """The decay for update number `step` (0-based). Without `warmup`, 0 at the first update,
        so the average starts at the weights themselves rather than at the random initialisation,
        then `decay`. With it, min(decay, (1 + step) / (ramp + step)): 1 / ramp at the first
        update, then an average over about the last 1/(ramp - 1) of the steps seen, until that
        is longer than `decay`'s."""
        if self.warmup:
            return min(self.decay, (1 + step) / (self.ramp + step))
        return 0.0 if step == 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; last.pt holds that step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"{signal.Signals(signum).name} at step {step}: {checkpoint} holds it")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class TrainResult:
    step: int
    final_loss: float | None  # None when no step was trained (a finished run resumed)
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
    loss curve; out/samples/ holds sample grids when `sample_every` is set, out/snapshots/ the
    EMA weights when `snapshot_every` is. Under torchrun (`place` from
    `ddpm_core.distributed.setup`) every rank trains and only rank 0 writes.
    """

    def __init__(self, model_config: ModelConfig, diffusion_config: DiffusionConfig, train_config: TrainConfig,
                 dataset: Dataset, out: str | Path, device: torch.device | str = "cpu", extra: dict | None = None,
                 holdout: torch.Tensor | None = None, place: Distributed = Distributed()):
        self.model_config, self.diffusion_config, self.config = model_config, diffusion_config, train_config
        self.dataset, self.out, self.device, self.place = dataset, Path(out), torch.device(device), place
        local_batch_size(train_config.batch_size, place.world_size)  # refused here, before any process waits
        cuda = self.device.type == "cuda"
        torch.manual_seed(train_config.seed)  # the same initial weights on every rank
        self.model = build_model(model_config).to(self.device)
        if train_config.channels_last and cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, train_config.ema_decay, train_config.ema_warmup, train_config.ema_ramp)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_config.lr, weight_decay=0.0,
                                           fused=True if train_config.fused_adam and cuda else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(train_config, k))
        self.schedule = NoiseSchedule.from_config(diffusion_config).to(self.device)
        self.holdout = holdout.to(self.device) if holdout is not None else None
        # The batch's draws come from a generator that starts where the global RNG stands now
        # (after the initial weights: where one process drew them before it had a generator);
        # then each rank reseeds its global RNG for what it draws alone.
        generator = torch.Generator(device=self.device)
        if self.device.type in ("cpu", "cuda"):
            generator.set_state(torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state())
        else:  # MPS and others: their generators hold another kind of state, so seed one afresh
            generator.manual_seed(train_config.seed)
        torch.manual_seed(train_config.seed + 1 + place.rank)
        # t uniform (the paper), or drawn by the loss history, which every rank keeps alike
        self.timesteps = LossAwareTimesteps(self.schedule.num_timesteps) \
            if train_config.timestep_sampling == "loss" else None
        self.state = TrainState(model_config, diffusion_config, train_config, place, dict(extra or {}),
                                self.model, self.ema.model, self.optimizer, self.scheduler, generator,
                                self.timesteps)
        forward: nn.Module = self.model
        if place.enabled:
            forward = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
        self.forward = torch.compile(forward) if train_config.compile else forward

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def ema_denoiser(self) -> nn.Module:
        """The EMA weights as an eps predictor, whatever the network predicts (for sampling and
        the held-out eps-MSE)."""
        return as_eps_denoiser(self.state.ema_model, self.model_config, self.schedule)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.pt"

    def load(self, path: Path) -> None:
        """Continue from the checkpoint at `path` (`TrainState.restore`: what it refuses, and why)."""
        self.state.restore(path)

    # -- one step of Alg. 1 -----------------------------------------------------------------
    def draw(self, x0: torch.Tensor, y: torch.Tensor | None) -> tuple:
        """This rank's rows of the global batch's draws: (label dropout mask or None, t, eps).
        Rank r of W takes the rows r, r + W, ... (its items of the batch); one process takes
        them all, in the order `loss_simple` draws them."""
        batch, rows = self.config.batch_size, slice(self.place.rank, None, self.place.world_size)
        generator = self.state.generator
        drop = None
        if y is not None and self.config.label_dropout > 0:
            drop = (torch.rand((batch,), device=y.device, generator=generator) < self.config.label_dropout)[rows]
        t = (sample_timesteps(batch, self.schedule.num_timesteps, x0.device, generator) if self.timesteps is None
             else self.timesteps.sample(batch, x0.device, generator))[rows]
        eps = torch.randn((batch, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[rows]
        return drop, t, eps

    def train_step(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """One step of Alg. 1 plus warmup, clipping and the EMA update. Returns the loss."""
        autocast = self.config.amp and self.device.type == "cuda"
        drop, t, eps = self.draw(x0, y)
        config = self.config
        weights = None if config.loss_weighting == "uniform" else timestep_weights(
            self.schedule, t, config.loss_weighting, config.min_snr_gamma, config.p2_gamma)
        if drop is not None:
            # Ho & Salimans 2022, Alg. 1: train the unconditional model jointly, as the "null"
            # label (index num_classes), so that classifier-free guidance can mix the two.
            y = torch.where(drop, torch.full_like(y, self.model_config.num_classes), y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = training_loss(self.forward, self.schedule, x0, self.model_config.prediction, config.objective, y,
                                 t=t, noise=eps, weights=weights, per_sample=self.timesteps is not None)
        if self.timesteps is not None:  # each term over T p_t: the same objective in expectation
            terms, loss = loss, (self.timesteps.weights(t) * loss).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step + 1}; stopped. The last good checkpoint "
                f"({self.checkpoint_path}, step {self.state.saved_step}) is kept. Try a lower --lr or turning off amp."
            )
        if self.timesteps is not None:
            self.record_losses(t, terms.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over the ranks
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model, self.step)
        self.state.step += 1
        return loss.detach()

    def record_losses(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        """Give the loss history every rank's (t, loss) of this step, in the global batch's order
        (rank r holds rows r, r + W, ...), so that every rank's history, and its next draws, agree."""
        shares = self.place.gather((t.cpu(), terms.cpu()))
        # (rows, ranks) read row by row: row 0 of every rank, then row 1, ...: the global order
        self.timesteps.update(torch.stack([t for t, _ in shares], 1).flatten(),
                              torch.stack([terms for _, terms in shares], 1).flatten())

    # -- the run ----------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: bool = False, extra_hooks: Sequence = ()) -> TrainResult:
        """Train until `config.steps`; with `resume`, continue from out/last.pt first.
        `extra_hooks` run on rank 0 after the library's (`hooks`), e.g. a notebook's live view
        (`ddpm_core.widgets.TrainingView`).

        The run owns its folder meanwhile (`files.folder_lock`: a second run into it is
        refused, naming this one), and SIGINT / SIGTERM stop it after the current step with
        last.pt saved, raising TrainingInterrupted. A resumed run first removes what a killed
        one left: unfinished temporary files, and log lines past the checkpoint it resumes.
        """
        main = self.place.is_main
        with folder_lock(self.out) if main else contextlib.nullcontext(), stop_requests() as stop:
            self.start(resume)
            first_step, start = self.step, time.perf_counter()
            with RunLog(self.out / "log.jsonl", self.step, enabled=main) as log, \
                    progress_bar(total=self.config.steps, initial=self.step, desc=f"training {self.out.name}",
                         disable=not (progress and main)) as bar:
                loss = self.loop(self.hooks(log, bar, extra_hooks), stop, bar)
        self.place.barrier()  # every rank returns once rank 0 has written the last checkpoint
        seconds = time.perf_counter() - start
        images = self.config.batch_size * (self.step - first_step)
        return TrainResult(self.step, loss, images / seconds, seconds, self.checkpoint_path)

    def start(self, resume: bool) -> None:
        """Load out/last.pt to resume (refusing a missing one), or refuse to start over one;
        then rank 0 removes the unfinished temporary files a killed run left."""
        if resume:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path} to continue from; "
                                        f"drop --resume to start a new run there")
            self.load(self.checkpoint_path)
        elif self.checkpoint_path.exists():
            raise FileExistsError(
                f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose another --out"
            )
        if self.place.is_main:
            remove_orphans(self.out)

    def hooks(self, log: RunLog, bar: tqdm, extra_hooks: Sequence = ()) -> list:
        """What runs after each step, in this order, each when it is due (`ddpm_core.monitor`):
        the log line, the checkpoint (held-out loss, best.pt, last.pt, loss.png), and on rank 0
        the EMA snapshot, the sample grid and then `extra_hooks`. A hook is any object with
        `after_step(trainer, loss, stopping)`."""
        hooks = [LogWindow(log, bar), Checkpointing(log)]
        if self.place.is_main:
            hooks += [Snapshots(), SampleGrids(), *extra_hooks]
        return hooks

    def loop(self, hooks: list, stop: list[int], bar: tqdm) -> float | None:
        """Alg. 1's loop from the current step to `config.steps`, the hooks after every step; a
        signal in `stop` (on any rank) ends it after a checkpoint. Returns the last step's
        loss, or None when no step was left to train."""
        batches = iter(self.loader())
        self.model.train()
        loss = None
        while self.step < self.config.steps:  # fetch only batches that will be trained on
            loss = self.train_step(*self.to_device(*next(batches)))
            stopping = self.stopping(stop)
            for hook in hooks:
                hook.after_step(self, loss, stopping)
            bar.update(1)
            if stopping:
                raise TrainingInterrupted(stop[0] if stop else signal.SIGTERM, self.step, self.checkpoint_path)
        return None if loss is None else loss.item()

    def stopping(self, stop: list[int]) -> bool:
        """Whether to stop after this step: a signal arrived. Under torchrun the ranks agree, at
        log steps (which synchronise anyway), stopping when any rank received one."""
        if not self.place.enabled:
            return bool(stop)
        log_due = self.step % self.config.log_every == 0 or self.step == self.config.steps
        return log_due and self.place.mean(torch.tensor(float(bool(stop)), device=self.device)).item() > 0

    def loader(self) -> DataLoader:
        """This rank's batches from the current step on. The loader gets its own generator (the
        worker seeds; offset by the rank), so creating it draws nothing from the global RNG,
        whose state the checkpoints carry; with num_workers = 0 a resumed run is exact."""
        generator = torch.Generator()
        generator.manual_seed(generator.initial_seed() + self.place.rank)
        pin = self.config.pin_memory and self.device.type == "cuda"
        return DataLoader(self.dataset, batch_sampler=epoch_batches(
                              len(self.dataset), self.config.batch_size, self.config.seed, self.step,
                              self.place.rank, self.place.world_size),
                          num_workers=self.config.num_workers, pin_memory=pin, generator=generator)

    def to_device(self, x0: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch on the training device (y only for a class-conditional model)."""
        cuda = self.device.type == "cuda"
        memory_format = torch.channels_last if self.config.channels_last and cuda else torch.contiguous_format
        x0 = x0.to(self.device, non_blocking=self.config.pin_memory, memory_format=memory_format)
        conditional = self.model_config.num_classes is not None
        return x0, y.to(self.device, non_blocking=self.config.pin_memory) if conditional else None
