"""Pictures: image grids of samples and plots of noise schedules.

This module owns turning tensors into figures and files; it computes nothing about diffusion.
Figures are built with `matplotlib.figure.Figure` (no pyplot state), so the library works
headless. Nothing here imports pyplot, so nothing registers IPython's PNG display of a figure:
a notebook runs `%matplotlib inline` first, or a returned figure shows as "<Figure size ...>".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.utils
from matplotlib.figure import Figure

from ddpm_core.files import atomic_path
from ddpm_core.schedule import NoiseSchedule


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map model space [-1, 1] to image space [0, 1], clipping what lies outside; uint8 images
    (as `ddpm_core.generate` yields and files store them) map [0, 255] to [0, 1]. Every picture
    below goes through this, so each takes either."""
    if images.dtype == torch.uint8:
        return images.detach().cpu().float() / 255
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images in [-1, 1] to uint8 [0, 255] on the CPU, as PNG files store them
    (clipped first: the evaluation protocol of Ho et al.'s code)."""
    return (to_unit_range(images) * 255).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """A (3, H', W') grid in [0, 1] of images (B, C, H, W) in [-1, 1] or uint8 (torchvision's make_grid)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return torchvision.utils.make_grid(to_unit_range(images), nrow=nrow, padding=padding, pad_value=1.0)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (B, C, H, W) in [-1, 1] or uint8 as one PNG grid, atomically (`files.atomic_path`);
    creates the folder. Returns the path."""
    with atomic_path(path) as tmp:
        torchvision.utils.save_image(image_grid(images, nrow), tmp)
    return Path(path)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100, **savefig_options) -> Path:
    """`fig.savefig(path)`, atomically: a full disk or a crash keeps the previous picture."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig_options)
    return Path(path)


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


def plot_image_table(images: torch.Tensor, column_titles: list[str], row_titles: list[str] | None = None,
                     size: float = 1.2) -> Figure:
    """A table of images (R, K, C, H, W) in [-1, 1] or uint8: R rows, K columns, titled. Used for x_t at
    chosen t (forward process) and for x_t / x0_pred along the reverse chain."""
    rows, cols = images.shape[:2]
    fig = Figure(figsize=(size * cols, size * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    pictures = to_unit_range(images)
    for r in range(rows):
        for k in range(cols):
            ax = axes[r][k]
            picture = pictures[r, k].permute(1, 2, 0)  # (H, W, C)
            ax.imshow((picture.squeeze(-1) if picture.shape[-1] == 1 else picture).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[k], fontsize=9)
            if k == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=9, rotation=0, ha="right", va="center")
    return fig


def plot_pixel_histogram(x_t: torch.Tensor, title: str) -> Figure:
    """The images x_t (B, C, H, W) as a grid beside the histogram of all their pixels, with the
    N(0, 1) density over it: where q(x_t | x_0) ends up as t -> T."""
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax_grid, ax_hist = fig.subplots(1, 2, width_ratios=(1, 1.4))
    grid = torchvision.utils.make_grid(x_t.detach().float().cpu().clamp(-3, 3), nrow=4, normalize=True,
                                       value_range=(-3, 3), pad_value=1.0)  # (3, H', W'), -3..3 -> 0..1
    ax_grid.imshow(grid.permute(1, 2, 0).numpy())
    ax_grid.set_axis_off()
    ax_grid.set_title(title)
    values = x_t.detach().float().cpu().flatten()
    ax_hist.hist(values.numpy(), bins=80, range=(-4, 4), density=True, alpha=0.7, label="pixels of x_t")
    z = torch.linspace(-4, 4, 200)
    ax_hist.plot(z.numpy(), (torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)).numpy(), "k--", label="N(0, 1)")
    ax_hist.set_xlim(-4, 4)
    ax_hist.set_ylim(0, 2.0)
    ax_hist.legend(loc="upper right")
    return fig


def plot_timestep_embedding(embedding: torch.Tensor, timesteps: torch.Tensor) -> Figure:
    """The sinusoidal embedding (N, D) of N timesteps as an image: one row per t."""
    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(embedding.detach().cpu().numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1,
                      extent=(0, embedding.shape[1], int(timesteps[-1]), int(timesteps[0])))
    ax.set_xlabel("embedding dimension (sin half, then cos half)")
    ax.set_ylabel("t")
    fig.colorbar(image, ax=ax)
    return fig


def save_gif(frames: torch.Tensor, path: str | Path, nrow: int | None = None, frame_ms: int = 80,
             hold_last_ms: int = 1500) -> Path:
    """An animated GIF of frames (K, B, C, H, W) in [-1, 1] or uint8, each frame an image grid of the
    batch (e.g. the reverse chain x_T -> x_0). The last frame is held for `hold_last_ms`."""
    from PIL import Image

    pictures = []
    for frame in frames:
        grid = (image_grid(frame, nrow) * 255).round().to(torch.uint8).permute(1, 2, 0)  # (H', W', 3)
        pictures.append(Image.fromarray(grid.numpy()).convert("P", palette=Image.Palette.ADAPTIVE))
    durations = [frame_ms] * (len(pictures) - 1) + [hold_last_ms]
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return Path(path)


def plot_image_grid(images: torch.Tensor, nrow: int = 8, title: str | None = None, scale: float = 0.4) -> Figure:
    """Images (B, C, H, W) in [-1, 1] or uint8 as one grid in a figure, `nrow` images per row."""
    grid = image_grid(images, nrow).permute(1, 2, 0)  # (H', W', 3)
    fig = Figure(figsize=(scale * grid.shape[1] / 10, scale * grid.shape[0] / 10 + (0.3 if title else 0)),
                 layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid.numpy())
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def plot_curves(x: Sequence[float], curves: dict[str, Sequence[float]], xlabel: str, ylabel: str,
                title: str | None = None, xs: dict[str, Sequence[float]] | None = None,
                ylim: tuple[float, float] | None = None) -> Figure:
    """Named curves over a shared x (or each over its own `xs[name]`), markers on the points:
    e.g. a classifier's accuracy against t, or guided accuracy against the guidance scale."""
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, values in curves.items():
        ax.plot(list((xs or {}).get(name, x)), list(values), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
