"""What the latents x_t hold: samples that share an x_t, and interpolation between the latents
of two images (Ho et al. 2020, Sec. 4.3 and Figs. 7-8).

This module owns those two experiments; the reverse steps are `ddpm_core.sampling`'s and the
progressive x0 predictions of Fig. 6 are its `Trajectory.x0_pred`. Every sampler here is the
ancestral DDPM one (all steps from t down), as in the paper's figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ddpm_core.config import VarianceName
from ddpm_core.diffusion import Denoiser, q_sample
from ddpm_core.sampling import eval_mode, ddpm_step, sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.runtime import progress_bar


def samples_from_latent(model: Denoiser, schedule: NoiseSchedule, x_t: torch.Tensor, t: int, num_samples: int,
                        variance: VarianceName = "fixedlarge", generator: torch.Generator | None = None,
                        progress: bool = False) -> torch.Tensor:
    """`num_samples` draws of x_0 ~ p(x_0 | x_t) for one latent x_t (C, H, W) at step t: the
    reverse process from x_t, with fresh noise for each draw. Returns (num_samples, C, H, W)."""
    start = x_t.unsqueeze(0).expand(num_samples, *x_t.shape).clone()
    return sample(model, schedule, start.shape, "ddpm", variance=variance, x_T=start, t_start=t,
                  generator=generator, progress=progress).samples


class SharedLatents(NamedTuple):
    """Ho et al. 2020, Fig. 7: for each t, the chain's x_t and draws of x_0 ~ p(x_0 | x_t)."""

    timesteps: list[int]  # the t, noisiest first
    latents: torch.Tensor  # (K, C, H, W): the chain's x_t at each t
    samples: torch.Tensor  # (K, N, C, H, W): N draws of x_0 from each latent
    chain_x0: torch.Tensor  # (C, H, W): where the chain itself ended


def shared_latents(model: Denoiser, schedule: NoiseSchedule, shape: Sequence[int], timesteps: Sequence[int],
                   num_samples: int, variance: VarianceName = "fixedlarge", generator: torch.Generator | None = None,
                   progress: bool = False) -> SharedLatents:
    """One reverse chain from x_T ~ N(0, I) for an image of `shape` (C, H, W), its x_t kept at
    each of `timesteps`; then `num_samples` continuations from each kept x_t. What the draws
    from one x_t share was fixed by step t: early (large t) only the rough layout, late almost
    everything."""
    chain = sample(model, schedule, (1, *shape), "ddpm", variance=variance, trajectory_steps=timesteps,
                   generator=generator, progress=progress)
    trajectory = chain.trajectory
    latents = trajectory.x_t[:, 0]  # (K, C, H, W), kept on the CPU
    device = chain.samples.device  # the model's, where the chain ran
    draws = [samples_from_latent(model, schedule, x_t.to(device), t, num_samples, variance, generator).cpu()
             for t, x_t in zip(trajectory.timesteps, latents)]
    return SharedLatents(trajectory.timesteps, latents, torch.stack(draws), chain.samples[0].cpu())


@torch.no_grad()
def interpolate(model: Denoiser, schedule: NoiseSchedule, x0_a: torch.Tensor, x0_b: torch.Tensor, t: int,
                lambdas: Sequence[float], variance: VarianceName = "fixedlarge",
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4.3 and Fig. 8: two images x0_a, x0_b (C, H, W) noised to step t
    with the same eps, their latents mixed as (1 - lambda) x_t + lambda x'_t for each lambda,
    then each mixture denoised by the reverse process from t. The reverse process draws one
    noise per step for all lambdas, so the rows differ by their latent only. Returns
    (len(lambdas), C, H, W); lambda 0 and 1 reconstruct the two images from their own x_t.

    With one eps for both, the mixed latent is the pixel blend of the two images noised with
    that eps: the reverse process has to turn a blend into an image of the data."""
    device, schedule = x0_a.device, schedule.to(x0_a.device)
    eps = torch.randn(x0_a.shape, generator=generator, device=device, dtype=x0_a.dtype)
    t_batch = torch.full((2,), t, device=device, dtype=torch.long)
    x_t_a, x_t_b = q_sample(schedule, torch.stack([x0_a, x0_b]), t_batch, noise=torch.stack([eps, eps]))
    lam = torch.tensor(list(lambdas), device=device, dtype=x0_a.dtype).view(-1, 1, 1, 1)
    x = (1 - lam) * x_t_a + lam * x_t_b  # (L, C, H, W)
    with eval_mode(model):
        for step in progress_bar(reversed(range(t + 1)), total=t + 1, desc="interpolating", disable=not progress,
                                 leave=False):
            eps_pred = model(x, torch.full((x.shape[0],), step, device=device, dtype=torch.long))
            z = torch.randn((1, *x.shape[1:]), generator=generator, device=device, dtype=x.dtype).expand_as(x)
            x = ddpm_step(schedule, eps_pred, x, step, variance, noise=z).x_prev
    return x
