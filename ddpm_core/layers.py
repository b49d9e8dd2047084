"""The building blocks of Ho et al.'s UNet: timestep embedding, ResNet block, attention,
down- and upsampling.

This module owns the layers; how they are wired into a network is `ddpm_core.unet` (and
`ddpm_core.denoisers` for the simpler baselines). Each block follows the authors' released
TensorFlow code (`diffusion_tf/models/unet.py`), so that their weights can be loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # the paper's GroupNorm groups (ModelConfig.norm_groups; fewer for narrow networks)
NORM_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon, used by the authors' code


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as in Ho et al.'s `get_timestep_embedding`.

    freq_i = exp(-ln(max_period) * i / (half - 1)) for i < half = dim // 2, and
    emb = [sin(t * freq), cos(t * freq)], zero-padded when dim is odd. t (B,) -> (B, dim).
    (improved-diffusion divides by `half` and puts cos first; we keep the DDPM form.)
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """SiLU(Dense(SiLU(Dense(sinusoid(t)))) [+ class embedding]): what every block receives.

    sinusoid(t) (ch) -> Dense(ch, 4ch) -> SiLU -> Dense(4ch, 4ch), as in Ho et al.'s code.
    With `num_classes`, a learned class embedding is added (Dhariwal & Nichol 2021); y = None
    selects an extra learned "null" label (index num_classes), used by classifier-free
    guidance. The final SiLU is the one each ResNet block applies before its own Dense,
    done here once.
    """

    def __init__(self, channels: int, emb_dim: int, num_classes: int | None = None):
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        self.linear_1 = nn.Linear(channels, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    def forward(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.linear_2(F.silu(self.linear_1(timestep_embedding(t, self.channels))))  # (B, emb_dim)
        if self.class_emb is not None:
            temb = temb + self.class_emb(torch.full_like(t, self.num_classes) if y is None else y)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=None) but was given class labels y")
        return F.silu(temb)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters. The authors initialise the last layer of every residual
    branch (and of the network) to zero, so each block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int = GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """A wide-ResNet block with the timestep added after the first convolution.

    h = conv1(SiLU(norm1(x))) + Dense(SiLU(temb)); h = conv2(dropout(SiLU(norm2(h))));
    out = shortcut(x) + h, the shortcut a 1x1 convolution when the width changes.

    The embedding is a shift per channel, constant over H x W; norm2 keeps it only if each of
    its `groups` holds two channels or more (one channel per group subtracts it again), so
    that case is refused.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int = GROUPS):
        super().__init__()
        if out_channels < 2 * groups:
            raise ValueError(f"GroupNorm({groups}) over {out_channels} channels would subtract the timestep "
                             f"embedding again (fewer than 2 channels per group); use groups <= {out_channels // 2}")
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), temb_act = SiLU(temb) (B, emb_dim), from TimestepEmbedding
        -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H * W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int = GROUPS):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        # softmax(q k^T / sqrt(C)) v, one head of width C as in the paper.
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    Padding (0, 1) on the right and bottom only, as TensorFlow's "SAME" does for stride 2,
    so the layer computes what the authors' trained weights expect.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
