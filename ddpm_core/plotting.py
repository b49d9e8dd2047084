"""Pictures: image grids of samples and plots of noise schedules.

This module owns turning tensors into figures and files; it computes nothing about diffusion.
Figures are built with `matplotlib.figure.Figure` (no pyplot state), so the library works
headless and a notebook shows a returned figure like any other.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision.utils
from matplotlib.figure import Figure

from ddpm_core.schedule import NoiseSchedule


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map model space [-1, 1] to image space [0, 1], clipping what lies outside."""
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images in [-1, 1] to uint8 [0, 255] on the CPU, as PNG files store them
    (clipped first: the evaluation protocol of Ho et al.'s code)."""
    return (to_unit_range(images) * 255).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """A (3, H', W') grid in [0, 1] of images (B, C, H, W) in [-1, 1] (torchvision's make_grid)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return torchvision.utils.make_grid(to_unit_range(images), nrow=nrow, padding=padding, pad_value=1.0)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (B, C, H, W) in [-1, 1] as one PNG grid; creates the folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(image_grid(images, nrow), path)
    return path


def plot_schedules(schedules: dict[str, NoiseSchedule]) -> Figure:
    """beta_t, alpha_bar_t and the signal-to-noise ratio (dB) against t, one line per schedule."""
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    ax_beta, ax_abar, ax_snr = fig.subplots(1, 3)
    for name, schedule in schedules.items():
        t = torch.arange(schedule.num_timesteps)
        ax_beta.plot(t, schedule.betas.cpu(), label=name)
        ax_abar.plot(t, schedule.alphas_cumprod.cpu(), label=name)
        ax_snr.plot(t, 10 * torch.log10(schedule.snr().cpu()), label=name)
    for ax, title in zip(
        (ax_beta, ax_abar, ax_snr),
        (r"$\beta_t$", r"$\bar\alpha_t$", r"SNR $=\bar\alpha_t / (1-\bar\alpha_t)$ in dB"),
    ):
        ax.set_title(title)
        ax.set_xlabel("t (0-indexed)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_beta.set_yscale("log")  # linear spans 1e-4..0.02; cosine ends at the 0.999 clip
    return fig
