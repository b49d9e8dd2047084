"""What a training run shows about itself, and the hooks that show it: a held-out loss that is
comparable across the run (for keeping the best model), sample grids, the loss curve; and the
hooks the training loop calls after each step to log, checkpoint, keep snapshots and draw grids.

This module owns those measurements and when they are taken; the loop is
`ddpm_core.training`'s, the files' contents `ddpm_core.train_state`'s. It never changes the
model or draws from the global RNG (every draw has its own generator), so monitoring cannot
change what a run computes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from torch import nn

from ddpm_core.diffusion import loss_simple
from ddpm_core.objectives import objective_name
from ddpm_core.plotting import save_figure, save_image_grid
from ddpm_core.sampling import ddim_sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.train_state import RunLog

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from ddpm_core.training import Trainer


@torch.inference_mode()
def heldout_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, num_timesteps: int = 10,
                 seed: int = 0) -> float:
    """L_simple on fixed images x0 (B, C, H, W), at `num_timesteps` evenly spaced t, with noise
    fixed by `seed`: the same question every time, so values from one run compare.

    This is what "best" means for best.pt: the lowest value of this, measured on the EMA
    weights at each checkpoint, on images the model does not train on (the test split).
    """
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(0, schedule.num_timesteps - 1, num_timesteps).round().long().tolist()
    losses = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        losses.append(loss_simple(model, schedule, x0, t=t_batch, noise=noise).item())
    return sum(losses) / len(losses)


def grid_samples(model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], steps: int = 100,
                 eta: float = 1.0, seed: int = 0) -> torch.Tensor:
    """DDIM samples (B, C, H, W) in [-1, 1] from noise fixed by `seed`, so that the grids of
    one run show the same starting noise at every stage of training.

    eta = 1 by default: on short runs the fresh noise of each step washes out the speckle that
    deterministic DDIM (eta = 0) leaves (measured on the laptop profile, see README)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    return ddim_sample(model, schedule, shape, num_steps=min(steps, schedule.num_timesteps), eta=eta,
                       generator=generator).samples


def write_sample_grid(model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], path: str | Path,
                      steps: int = 100, eta: float = 1.0, seed: int = 0) -> Path:
    """`grid_samples` as a PNG grid at `path`."""
    return save_image_grid(grid_samples(model, schedule, shape, steps, eta, seed), path)


WEIGHTING_NAMES = {"min_snr": "Min-SNR", "p2": "P2"}  # TrainConfig.loss_weighting, as a legend names it


def plot_loss_curve(records: list[dict] | dict[str, list[dict]], weighting: str = "uniform",
                    objective: str | None = None) -> Figure:
    """Training loss (per logging window) and held-out loss against step, log scale: one run's
    log records, or several runs by name (for comparisons). `weighting` is the runs'
    `TrainConfig.loss_weighting`: the training loss is the weighted eps-MSE it optimises (P2's
    is several times smaller than L_simple), the held-out loss always plain L_simple (the
    eps-MSE, whatever the network predicts). `objective` names another training loss
    (`objectives.objective_name`: the bound's terms, or the MSE of x0 or mu-tilde)."""
    runs = records if isinstance(records, dict) else {"": records}
    if objective is None:
        objective = "L_simple" if weighting == "uniform" else f"L_simple weighted by {WEIGHTING_NAMES.get(weighting, weighting)}"
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for name, run in runs.items():
        prefix = f"{name}: " if name else ""
        train = [(r["step"], r["loss"]) for r in run if "loss" in r]
        heldout = [(r["step"], r["heldout_loss"]) for r in run if "heldout_loss" in r]
        if train:
            ax.plot(*zip(*train), label=f"{prefix}training loss ({objective})")
        if heldout:
            ax.plot(*zip(*heldout), "o-", label=f"{prefix}held-out L_simple, EMA weights")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:  # none yet when a run stops before its first log line
        ax.legend(fontsize=8)
    return fig


# -- the hooks the training loop calls after every step, in this order ------------------------
class LogWindow:
    """Every `log_every` steps and at the last: one log line for the steps since the previous
    one (mean loss over them and the ranks, lr, images/s, elapsed seconds), shown on the
    progress bar too. Every rank calls it (the mean is a collective)."""

    def __init__(self, log: RunLog, bar: tqdm):
        self.log, self.bar, self.losses = log, bar, []
        self.start = self.run_start = time.perf_counter()

    def after_step(self, trainer: Trainer, loss: torch.Tensor, stopping: bool) -> None:
        self.losses.append(loss)
        config, step = trainer.config, trainer.step
        if step % config.log_every and step != config.steps:
            return
        mean_loss = trainer.place.mean(torch.stack(self.losses).mean()).item()
        now = time.perf_counter()
        record = {"step": step, "loss": mean_loss, "lr": trainer.scheduler.get_last_lr()[0],
                  "images_per_s": len(self.losses) * config.batch_size / (now - self.start),
                  "elapsed_s": now - self.run_start}
        self.log.write(record)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)
        self.start, self.losses = now, []


class Checkpointing:
    """Every `checkpoint_every` steps, at the last and when stopping: the held-out loss of the
    EMA weights (`heldout_loss`; out/best.pt keeps the lowest), out/last.pt, and the loss curve
    out/loss.png, drawn from the log's records in memory. Every rank calls it; rank 0 writes."""

    def __init__(self, log: RunLog):
        self.log = log

    def after_step(self, trainer: Trainer, loss: torch.Tensor, stopping: bool) -> None:
        config, state, out = trainer.config, trainer.state, trainer.out
        if state.step % config.checkpoint_every and state.step != config.steps and not stopping:
            return
        main = trainer.place.is_main
        if main and trainer.holdout is not None:
            value = heldout_loss(trainer.ema_denoiser, trainer.schedule, trainer.holdout, seed=config.seed)
            is_best = value < state.best_heldout_loss
            if is_best:
                state.best_heldout_loss = value
                state.save_weights(out / "best.pt", heldout_loss=value)
            self.log.write({"step": state.step, "heldout_loss": value, "best": is_best})
        state.save(trainer.checkpoint_path)
        if main:
            name = objective_name(trainer.model_config, config)
            save_figure(plot_loss_curve(self.log.records, config.loss_weighting, name), out / "loss.png")


class Snapshots:
    """Every `snapshot_every` steps (0: never), the EMA weights as out/snapshots/step_N.pt,
    weights only (for FID over training). Rank 0 only."""

    def after_step(self, trainer: Trainer, loss: torch.Tensor, stopping: bool) -> None:
        every, step = trainer.config.snapshot_every, trainer.step
        if every and step % every == 0:
            trainer.state.save_weights(trainer.out / "snapshots" / f"step_{step:07d}.pt")


class SampleGrids:
    """Every `sample_every` steps (0: never), a grid of `sample_images` DDIM samples of the EMA
    weights as out/samples/step_N.png (`write_sample_grid`, the same noise each time). Rank 0 only."""

    def after_step(self, trainer: Trainer, loss: torch.Tensor, stopping: bool) -> None:
        config, model_config, step = trainer.config, trainer.model_config, trainer.step
        if config.sample_every and step % config.sample_every == 0:
            shape = (config.sample_images, model_config.in_channels, model_config.image_size, model_config.image_size)
            write_sample_grid(trainer.ema_denoiser, trainer.schedule, shape,
                              trainer.out / "samples" / f"step_{step:07d}.png", seed=config.seed)
