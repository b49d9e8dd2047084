"""Simpler denoisers beside the UNet, and `build_model`, which makes any of them from a config.

This module owns the baselines that show why the UNet wins: a plain convolutional network and
a ResNet, both at full resolution (no down- or upsampling, so each pixel sees only a small
neighbourhood). They share the UNet's signature (x_t, t[, y]) -> eps_pred, as must any model
you plug into `ddpm_core.diffusion` and `ddpm_core.sampling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddpm_core.config import ModelConfig
from ddpm_core.layers import ResnetBlock, TimestepEmbedding, group_norm, zero_module
from ddpm_core.unet import UNet


class _FullResolutionDenoiser(nn.Module):
    """Shared frame: timestep (and class) embedding, input and output convolutions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch, self.emb_dim = config.base_channels, 4 * config.base_channels
        self.temb = TimestepEmbedding(ch, self.emb_dim, config.num_classes)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.norm_out = group_norm(ch, config.norm_groups)
        self.conv_out = zero_module(nn.Conv2d(ch, config.in_channels, 3, padding=1))

    def body(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(self.conv_in(x_t), self.temb(t, y))  # (B, ch, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class ConvDenoiser(_FullResolutionDenoiser):
    """A plain stack of `num_res_blocks` 3x3 convolutions (GroupNorm, SiLU, timestep added)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        ch = config.base_channels
        self.convs = nn.ModuleList(nn.Conv2d(ch, ch, 3, padding=1) for _ in range(config.num_res_blocks))
        self.norms = nn.ModuleList(group_norm(ch, config.norm_groups) for _ in range(config.num_res_blocks))
        self.temb_projs = nn.ModuleList(nn.Linear(self.emb_dim, ch) for _ in range(config.num_res_blocks))

    def body(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        for conv, norm, temb_proj in zip(self.convs, self.norms, self.temb_projs):
            h = conv(F.silu(norm(h))) + temb_proj(temb_act)[:, :, None, None]
        return h


class ResNetDenoiser(_FullResolutionDenoiser):
    """`num_res_blocks` of the UNet's ResNet blocks, all at full resolution."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        ch = config.base_channels
        self.blocks = nn.ModuleList(
            ResnetBlock(ch, ch, self.emb_dim, config.dropout, config.norm_groups) for _ in range(config.num_res_blocks)
        )

    def body(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, temb_act)
        return h


def build_model(config: ModelConfig) -> nn.Module:
    """The denoiser that `config.kind` names: "unet", "cnn" or "resnet"."""
    return {"unet": UNet, "cnn": ConvDenoiser, "resnet": ResNetDenoiser}[config.kind](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(config: ModelConfig) -> float:
    """FLOPs that one training image costs `config`'s network, forward and backward, as
    `torch.utils.flop_counter` counts them (convolutions, matmuls, attention; elementwise
    work is free there). A run's training compute is this x batch_size x steps."""
    model = build_model(config)
    x = torch.zeros(2, config.in_channels, config.image_size, config.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(2, dtype=torch.long)).square().mean().backward()
    return counter.get_total_flops() / 2
