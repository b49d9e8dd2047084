"""What a training run shows about itself: a held-out loss that is comparable across the run
(for keeping the best model), sample grids, and the loss curve.

This module owns those measurements; it never changes the model or draws from the global RNG
(every draw has its own generator), so monitoring cannot change what a run computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ddpm_core.diffusion import loss_simple
from ddpm_core.plotting import save_image_grid
from ddpm_core.sampling import ddim_sample
from ddpm_core.schedule import NoiseSchedule


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


def write_sample_grid(model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], path: str | Path,
                      steps: int = 100, eta: float = 1.0, seed: int = 0) -> Path:
    """DDIM samples (fixed seed, so grids of one run show the same starting noise) as a PNG.

    eta = 1 by default: on short runs the fresh noise of each step washes out the speckle that
    deterministic DDIM (eta = 0) leaves (measured on the laptop profile, see README)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = ddim_sample(model, schedule, shape, num_steps=min(steps, schedule.num_timesteps), eta=eta,
                          generator=generator)
    return save_image_grid(samples.samples, path)


def plot_loss_curve(records: list[dict] | dict[str, list[dict]]) -> Figure:
    """Training loss (per logging window) and held-out loss against step, log scale: one run's
    log records, or several runs by name (for comparisons)."""
    runs = records if isinstance(records, dict) else {"": records}
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for name, run in runs.items():
        prefix = f"{name}: " if name else ""
        train = [(r["step"], r["loss"]) for r in run if "loss" in r]
        heldout = [(r["step"], r["heldout_loss"]) for r in run if "heldout_loss" in r]
        if train:
            ax.plot(*zip(*train), label=f"{prefix}training loss (L_simple)")
        if heldout:
            ax.plot(*zip(*heldout), "o-", label=f"{prefix}held-out loss, EMA weights")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
