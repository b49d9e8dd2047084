"""Training: Ho et al. 2020, Alg. 1 with what their code adds (warmup, gradient clipping, EMA),
checkpoints that survive a crash, and resumption that continues exactly where a run stopped,
in one process or in several under torchrun (DistributedDataParallel).

This module owns the optimisation loop and its state; the loss is `ddpm_core.diffusion`'s
L_simple, the file format `ddpm_core.checkpoint`'s, the process group `ddpm_core.distributed`'s.
Determinism: the batch order of each epoch is a permutation seeded by (seed, epoch), and the
torch RNG state (timesteps, noise, flips) travels in every checkpoint, so on the CPU a resumed
run computes the same weights as one that never stopped.

Several processes: `batch_size` is the global batch; torch's DistributedSampler gives rank r
the items r, r + W, ... of each epoch's permutation, so the W shares of a step together are
the single-process batch. The diffusion's draws for that batch (t, eps, label dropout) come
from one generator that every rank holds in the same state, each rank taking its rows, so W
processes compute the update one process computes on the global batch (the gloo test checks
it). What a rank draws alone (dropout masks, flips) comes from its own seed, seed + 1 + rank.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ddpm_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, stored_config
from ddpm_core.config import DiffusionConfig, ModelConfig, TrainConfig, to_dict
from ddpm_core.denoisers import build_model
from ddpm_core.diffusion import loss_simple, sample_timesteps
from ddpm_core.distributed import Distributed
from ddpm_core.files import folder_lock, remove_orphans, write_text
from ddpm_core.monitor import heldout_loss, plot_loss_curve, write_sample_grid
from ddpm_core.plotting import save_figure
from ddpm_core.schedule import NoiseSchedule

log = logging.getLogger(__name__)

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


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch; it must split evenly."""
    if batch_size % world_size:
        raise ValueError(f"the global batch of {batch_size} does not split evenly over {world_size} processes; "
                         f"choose a --batch-size that is a multiple of --nproc_per_node")
    return batch_size // world_size


def epoch_batches(num_items: int, batch_size: int, seed: int, start_step: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[list[int]]:
    """Index batches forever, rank `rank`'s share (batch_size / world_size) of each global batch.

    Epoch e is the permutation seeded by seed + e, dealt out by torch's DistributedSampler
    (rank r gets its items r, r + W, r + 2W, ...) and cut into full batches, so the W shares of
    step k together are the single-process batch k. Starting at `start_step` skips exactly the
    batches already trained on.
    """
    local_batch = local_batch_size(batch_size, world_size)
    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = len(sampler) // local_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {num_items} images, fewer than one batch of {batch_size}")
    epoch, position = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)  # the permutation seeded by seed + epoch
        order = list(sampler)
        for i in range(position, per_epoch):
            yield order[i * local_batch : (i + 1) * local_batch]
        epoch, position = epoch + 1, 0


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; last.pt holds that step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"{signal.Signals(signum).name} at step {step}: {checkpoint} holds it")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM are recorded in the list it yields
    instead of killing the process mid-step, so the loop can save and stop; a second signal
    interrupts at once. Only the main thread can catch signals: elsewhere nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


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
    loss curve; out/samples/ holds sample grids when `sample_every` is set. Under torchrun
    (`place` from `ddpm_core.distributed.setup`) every rank trains and only rank 0 writes.
    """

    def __init__(self, model_config: ModelConfig, diffusion_config: DiffusionConfig, train_config: TrainConfig,
                 dataset: Dataset, out: str | Path, device: torch.device | str = "cpu", extra: dict | None = None,
                 holdout: torch.Tensor | None = None, place: Distributed = Distributed()):
        self.model_config, self.diffusion_config, self.config = model_config, diffusion_config, train_config
        self.dataset, self.out, self.device, self.place = dataset, Path(out), torch.device(device), place
        local_batch_size(train_config.batch_size, place.world_size)  # refused here, before any process waits
        self.extra = extra or {}  # plain data stored with the run (dataset name, profile, ...)
        cuda = self.device.type == "cuda"
        torch.manual_seed(train_config.seed)  # the same initial weights on every rank
        self.model = build_model(model_config).to(self.device)
        if train_config.channels_last and cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, train_config.ema_decay, train_config.ema_warmup)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_config.lr, weight_decay=0.0,
                                           fused=True if train_config.fused_adam and cuda else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(train_config, k))
        self.schedule = NoiseSchedule.from_config(diffusion_config).to(self.device)
        self.holdout = holdout.to(self.device) if holdout is not None else None
        self.best_heldout_loss = math.inf
        self.step = 0
        self._saved_step: int | None = None  # the step of the last checkpoint written or read
        # The draws for the global batch: one process uses the global RNG, as it always has;
        # W processes share a generator that starts where that global RNG stands now, and
        # reseed their own global RNG for what each draws alone.
        self.shared_rng: torch.Generator | None = None
        forward: nn.Module = self.model
        if place.enabled:
            self.shared_rng = torch.Generator(device=self.device)
            self.shared_rng.set_state(torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state())
            torch.manual_seed(train_config.seed + 1 + place.rank)
            forward = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
        self.forward = torch.compile(forward) if train_config.compile else forward

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.pt"

    def rng_state(self) -> dict:
        """This rank's own RNG state (the global CPU one, and its GPU's)."""
        cuda = self.device.type == "cuda"
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def checkpoint(self, log_file) -> None:
        """Measure the held-out loss (keeping best.pt), save last.pt, redraw the loss curve.
        Every rank calls it (their RNG states are gathered into last.pt); rank 0 writes."""
        rank_rng = self.place.gather(self.rng_state()) if self.place.enabled else None
        self._saved_step = self.step
        if not self.place.is_main:
            return
        if self.holdout is not None:
            value = heldout_loss(self.ema.model, self.schedule, self.holdout, seed=self.config.seed)
            is_best = value < self.best_heldout_loss
            if is_best:
                self.best_heldout_loss = value
                self.save_ema(self.out / "best.pt", heldout_loss=value)
            log_file.write(json.dumps({"step": self.step, "heldout_loss": value, "best": is_best}) + "\n")
            log_file.flush()
        self.save(rank_rng)
        save_figure(plot_loss_curve(read_log(self.out / "log.jsonl")), self.out / "loss.png")

    def save(self, rank_rng: list[dict] | None = None) -> Path:
        own = self.rng_state()
        train_state = {
            "step": self.step,
            "best_heldout_loss": self.best_heldout_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": own["cpu"],
            "cuda_rng": [] if own["cuda"] is None else [own["cuda"]],
            "train_config": to_dict(self.config),
            "world_size": self.place.world_size,
        }
        if self.place.enabled:  # each rank's own state, and the one they share
            train_state["rank_rng"] = rank_rng
            train_state["shared_rng"] = self.shared_rng.get_state()
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
                f"{path} was trained with another configuration (checkpoint: {checkpoint.model_config}, "
                f"{checkpoint.diffusion_config}; requested: {self.model_config}, {self.diffusion_config}): "
                f"resume with the same profile and options, or write to a new --out folder"
            )
        if checkpoint.train_state is None:
            raise ValueError(f"{path} holds weights only (no optimizer state); it cannot be resumed")
        try:
            self._restore(checkpoint.train_state, checkpoint, path)
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as error:
            raise ValueError(f"{path}: its training state is damaged ({type(error).__name__}: {error}); "
                             f"resume from a copy, or start a new run") from error

    def _restore(self, state: dict, checkpoint: Checkpoint, path: Path) -> None:
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
        self.ema.model.load_state_dict(checkpoint.ema_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.best_heldout_loss = state["best_heldout_loss"]
        own = state["rank_rng"][self.place.rank] if self.place.enabled else \
            {"cpu": state["torch_rng"], "cuda": state["cuda_rng"][0] if state["cuda_rng"] else None}
        torch.set_rng_state(own["cpu"].cpu())
        if own["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"].cpu(), self.device)
        if self.place.enabled:
            self.shared_rng.set_state(state["shared_rng"].cpu())

    # -- the loop ---------------------------------------------------------------------------
    def draw(self, x0: torch.Tensor, y: torch.Tensor | None) -> tuple:
        """This rank's rows of the global batch's draws: (label dropout mask or None, t, eps).
        In one process they are exactly what `loss_simple` and the label dropout drew before."""
        batch, rows = self.config.batch_size, slice(self.place.rank, None, self.place.world_size)
        drop = None
        if y is not None and self.config.label_dropout > 0:
            drop = (torch.rand((batch,), device=y.device, generator=self.shared_rng) < self.config.label_dropout)[rows]
        t = sample_timesteps(batch, self.schedule.num_timesteps, x0.device, self.shared_rng)[rows]
        eps = torch.randn((batch, *x0.shape[1:]), generator=self.shared_rng, device=x0.device, dtype=x0.dtype)[rows]
        return drop, t, eps

    def train_step(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """One step of Alg. 1 plus warmup, clipping and the EMA update. Returns the loss."""
        autocast = self.config.amp and self.device.type == "cuda"
        drop, t, eps = self.draw(x0, y)
        if drop is not None:
            # Ho & Salimans 2022, Alg. 1: train the unconditional model jointly, as the "null"
            # label (index num_classes), so that classifier-free guidance can mix the two.
            y = torch.where(drop, torch.full_like(y, self.model_config.num_classes), y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_simple(self.forward, self.schedule, x0, y, t=t, noise=eps)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step + 1}; stopped. The last good checkpoint "
                f"({self.checkpoint_path}, step {self._saved_step}) is kept. Try a lower --lr or turning off amp."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over the ranks
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return loss.detach()

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

    def run(self, resume: bool = False, progress: bool = False) -> TrainResult:
        """Train until `config.steps`; with `resume`, continue from out/last.pt first.

        The run owns its folder meanwhile (`files.folder_lock`: a second run into it is
        refused, naming this one), and SIGINT / SIGTERM stop it after the current step with
        last.pt saved, raising TrainingInterrupted. A resumed run first removes what a killed
        one left: unfinished temporary files, and log lines past the checkpoint it resumes.
        """
        main = self.place.is_main
        with folder_lock(self.out) if main else contextlib.nullcontext(), stop_requests() as stop:
            if resume:
                if not self.checkpoint_path.is_file():
                    raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path} to continue from; "
                                            f"drop --resume to start a new run there")
                self.load(self.checkpoint_path)
            elif self.checkpoint_path.exists():
                raise FileExistsError(
                    f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose another --out"
                )
            if main:
                remove_orphans(self.out)
                trim_log(self.out / "log.jsonl", self.step)
            self._saved_step = self.step if resume else None
            first_step, start = self.step, time.perf_counter()
            with (self.out / "log.jsonl").open("a") if main else contextlib.nullcontext() as log_file:
                loss = self.loop(log_file, stop, progress)
        self.place.barrier()  # every rank returns once rank 0 has written the last checkpoint
        seconds = time.perf_counter() - start
        images = self.config.batch_size * (self.step - first_step)
        return TrainResult(self.step, loss, images / seconds, seconds, self.checkpoint_path)

    def loop(self, log_file, stop: list[int], progress: bool = False) -> float | None:
        """Alg. 1's loop from the current step to `config.steps`, logging and checkpointing as
        configured; a signal in `stop` (on any rank) ends it after a checkpoint. Returns the
        last step's loss, or None when no step was left to train."""
        main, conditional = self.place.is_main, self.model_config.num_classes is not None
        non_blocking = self.config.pin_memory
        memory_format = torch.channels_last if self.config.channels_last and self.device.type == "cuda" \
            else torch.contiguous_format
        batches = iter(self.loader())
        self.model.train()
        window, loss = {"start": time.perf_counter(), "losses": [], "run_start": time.perf_counter()}, None
        with tqdm(total=self.config.steps, initial=self.step, desc="training", disable=not (progress and main)) as bar:
            while self.step < self.config.steps:  # fetch only batches that will be trained on
                x0, y = next(batches)
                x0 = x0.to(self.device, non_blocking=non_blocking, memory_format=memory_format)
                y = y.to(self.device, non_blocking=non_blocking) if conditional else None
                loss = self.train_step(x0, y)
                window["losses"].append(loss)
                log_due = self.step % self.config.log_every == 0 or self.step == self.config.steps
                if log_due:
                    self.log_window(window, log_file, bar)
                stopping = bool(stop)
                if self.place.enabled:  # the ranks agree when to stop, at log steps, which synchronise anyway
                    stopping = log_due and self.place.mean(torch.tensor(float(stopping), device=self.device)).item() > 0
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps or stopping:
                    self.checkpoint(log_file)
                if main:
                    self.keep_pictures()
                bar.update(1)
                if stopping:
                    raise TrainingInterrupted(stop[0] if stop else signal.SIGTERM, self.step, self.checkpoint_path)
        return None if loss is None else loss.item()

    def log_window(self, window: dict, log_file, bar) -> None:
        """One log.jsonl line for the steps since the last one: mean loss over them (and the
        ranks), lr, images/s, elapsed seconds; shown on the progress bar too."""
        mean_loss = self.place.mean(torch.stack(window["losses"]).mean()).item()
        now = time.perf_counter()
        record = {
            "step": self.step, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": len(window["losses"]) * self.config.batch_size / (now - window["start"]),
            "elapsed_s": now - window["run_start"],
        }
        if self.place.is_main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        window.update(start=now, losses=[])

    def keep_pictures(self) -> None:
        """Rank 0's extras along the way: EMA snapshots and sample grids, when they are due."""
        if self.config.snapshot_every and self.step % self.config.snapshot_every == 0:
            self.save_ema(self.out / "snapshots" / f"step_{self.step:07d}.pt")
        if self.config.sample_every and self.step % self.config.sample_every == 0:
            shape = (self.config.sample_images, self.model_config.in_channels, *[self.model_config.image_size] * 2)
            write_sample_grid(self.ema.model, self.schedule, shape,
                              self.out / "samples" / f"step_{self.step:07d}.png", seed=self.config.seed)


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

