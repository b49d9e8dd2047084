"""The UNet of Ho et al. 2020 (Appendix B), wired as in the authors' released code.

This module owns the network eps_theta(x_t, t); its layers are in `ddpm_core.layers`. It
knows nothing of schedules or sampling: it maps (x_t, t) to a prediction of eps.

Shape walk-through for the paper's CIFAR-10 model (base 128, mults (1, 2, 2, 2), 2 blocks):
32x32x128 -> 16x16x256 (attention) -> 8x8x256 -> 4x4x256 -> middle (attention) -> back up,
each up level taking num_res_blocks + 1 skip connections. 35.7M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.config import ModelConfig
from ddpm_core.layers import AttentionBlock, Downsample, ResnetBlock, TimestepEmbedding, Upsample, group_norm, zero_module


class Level(nn.Module):
    """One resolution of the UNet: ResNet blocks, each followed by attention or identity,
    then an optional resampling layer (down on the way in, up on the way out)."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): (B, C, H, W), (B,) long[, (B,) long] -> (B, C, H, W).

    With `config.num_classes` set, a class embedding is added to the timestep embedding
    (see `TimestepEmbedding`); y = None then selects the learned "no class" label.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "unet":
            raise ValueError(f"UNet needs a config of kind 'unet', got {config.kind!r}")
        self.config = config
        ch, emb_dim, groups = config.base_channels, 4 * config.base_channels, config.norm_groups
        widths = [ch * m for m in config.channel_mults]
        attn_at = set(config.attention_resolutions) if config.attention else set()

        def attention(channels: int, resolution: int) -> nn.Module:
            return AttentionBlock(channels, groups) if resolution in attn_at else nn.Identity()

        self.temb = TimestepEmbedding(ch, emb_dim, config.num_classes)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Downsampling: remember the width of every tensor pushed onto the skip stack.
        skip_widths, width, last = [ch], ch, len(widths) - 1
        self.down = nn.ModuleList()
        for level, (out, res) in enumerate(zip(widths, config.resolutions)):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(width, out, emb_dim, config.dropout, groups))
                attns.append(attention(out, res))
                width = out
                skip_widths.append(width)
            resample = Downsample(width) if level != last else None
            if resample is not None:
                skip_widths.append(width)
            self.down.append(Level(blocks, attns, resample))

        self.mid_block1 = ResnetBlock(width, width, emb_dim, config.dropout, groups)
        self.mid_attn = AttentionBlock(width, groups) if config.attention else nn.Identity()
        self.mid_block2 = ResnetBlock(width, width, emb_dim, config.dropout, groups)

        # Upsampling: num_res_blocks + 1 blocks per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out, res = widths[level], config.resolutions[level]
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(width + skip_widths.pop(), out, emb_dim, config.dropout, groups))
                attns.append(attention(out, res))
                width = out
            self.up.append(Level(blocks, attns, Upsample(width) if level != 0 else None))

        self.norm_out = group_norm(width, groups)
        self.conv_out = zero_module(nn.Conv2d(width, config.in_channels, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        halvings = len(self.config.channel_mults) - 1
        if x_t.shape[-1] % 2**halvings or x_t.shape[-2] % 2**halvings:
            raise ValueError(
                f"this UNet halves its input {halvings} times, so H and W must be divisible by "
                f"{2**halvings}; got {tuple(x_t.shape[-2:])} (configured for {self.config.image_size})"
            )
        temb_act = self.temb(t, y)  # SiLU(temb), (B, 4ch)

        h = self.conv_in(x_t)  # (B, ch, H, W)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb_act))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb_act)), temb_act)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb_act))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
