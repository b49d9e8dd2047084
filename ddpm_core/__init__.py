"""ddpm_core: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020), readable and tested.

Modules, in the order data flows: config -> schedule -> diffusion (forward process, loss) ->
layers / unet / denoisers (the model) -> data -> profiles / runs -> training (train_state,
monitor) -> sampling (DDPM, DDIM) -> classifier / guidance -> generation (N images from a
checkpoint) -> evaluation -> plotting / widgets -> cli / commands. README.md has the full table.
"""

from ddpm_core.config import DiffusionConfig, ModelConfig
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.diffusion import loss_simple, predict_x0_from_eps, q_posterior, q_sample
from ddpm_core.sampling import ddim_sample, ddim_step, ddpm_sample, ddpm_step, sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.unet import UNet

__all__ = [
    "DiffusionConfig",
    "ModelConfig",
    "NoiseSchedule",
    "UNet",
    "build_model",
    "count_parameters",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "generate",
    "loss_simple",
    "predict_x0_from_eps",
    "q_posterior",
    "q_sample",
    "sample",
]


def __getattr__(name: str):
    """`ddpm_core.generate` on first use: it brings in checkpoints, guidance and plotting, which
    `import ddpm_core` (and the presets in ddpm_core.profiles) should not pay for."""
    if name == "generate":
        from ddpm_core.generation import generate

        return generate
    raise AttributeError(f"module 'ddpm_core' has no attribute {name!r}")
