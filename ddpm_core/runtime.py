"""Where code runs and how it is seeded: device selection and the one seeding function.

This module owns the choice of device and the global seeds; it holds no model or data code.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch

from ddpm_core.config import check_choice

DeviceName = Literal["auto", "cpu", "cuda", "mps"]


def resolve_device(name: DeviceName | str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; a named device must be available."""
    kind = name.split(":")[0]  # "cuda:1" is a CUDA device too
    check_choice(kind, DeviceName, "device")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but is not available; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); return a CPU generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (samplers draw their noise there), seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)
