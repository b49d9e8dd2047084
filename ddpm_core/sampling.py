"""The reverse process: DDPM ancestral sampling and DDIM, each a step function plus a loop.

This module owns p(x_{t-1} | x_t) given the model's eps prediction; it never builds or trains
a model. A step takes eps_pred and returns x_prev, so the whole reverse loop fits in a few
lines that a notebook can write itself:

    x = torch.randn(shape, generator=generator)
    for t in reversed(range(schedule.num_timesteps)):
        eps_pred = model(x, torch.full((len(x),), t))
        x = ddpm_step(schedule, eps_pred, x, t, generator=generator).x_prev

`sample` is that loop, for either sampler, with an optional guidance gradient (see
`ddpm_core.guidance`), trajectories, a progress bar, eval mode and `torch.no_grad()` added;
`ddpm_sample` and `ddim_sample` are `sample` with the sampler named. Drawing many images from
a checkpoint, in batches, guided or not, is `ddpm_core.generation`'s. t is 0-indexed (index t
is the paper's step t + 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from ddpm_core.config import DDIM_STEPS, SamplerConfig, SamplerName, SpacingName, VarianceName, check_choice
from ddpm_core.diffusion import Denoiser, predict_eps_from_x0, predict_x0_from_eps, q_posterior
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.runtime import progress_bar


class StepOutput(NamedTuple):
    x_prev: torch.Tensor  # x_{t-1} (B, C, H, W)
    x0_pred: torch.Tensor  # the x0 this step predicted (clipped if asked), (B, C, H, W)


class Trajectory(NamedTuple):
    timesteps: list[int]  # the t recorded, in the order visited (descending)
    x_t: torch.Tensor  # (K, B, C, H, W): the input of step t, on the CPU
    x0_pred: torch.Tensor  # (K, B, C, H, W): the x0 predicted at step t, on the CPU


class SampleOutput(NamedTuple):
    samples: torch.Tensor  # x_0 (B, C, H, W)
    trajectory: Trajectory | None


def ddpm_step(
    schedule: NoiseSchedule,
    eps_pred: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    variance: VarianceName = "fixedlarge",
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_grad: torch.Tensor | None = None,
) -> StepOutput:
    """One ancestral step x_t -> x_{t-1} ~ N(mu_tilde(x_t, x0_pred), sigma_t^2 I).

    Ho et al. 2020, Alg. 2, in the form of the authors' code: the posterior mean is formed
    from a (clipped) x0 prediction rather than Alg. 2's closed form, which it equals when no
    clipping happens. `variance`: "fixedlarge" sigma_t^2 = beta_t (the paper's CIFAR-10
    choice, FID 3.17), "fixedsmall" sigma_t^2 = beta_tilde_t (Sec. 3.2).
    `guidance_grad` g (B, C, H, W), e.g. s * grad log p(y | x_t): the mean becomes
    mu + sigma_t^2 g (Dhariwal & Nichol 2021, Alg. 1), with this step's own variance.
    """
    check_choice(variance, VarianceName, "variance")
    # 1. predict x0 from eps: Ho et al. 2020, Eq. (15)
    x0_pred = predict_x0_from_eps(schedule, x_t, t, eps_pred)
    # 2. clip x0 to [-1, 1], the data range
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    # 3. posterior mean: Ho et al. 2020, Eq. (7)
    mean = q_posterior(schedule, x0_pred, x_t, t).mean
    sigma_sq = schedule.betas[t] if variance == "fixedlarge" else schedule.posterior_variance[t]
    # 3b. classifier guidance shifts the mean by Sigma g: Dhariwal & Nichol 2021, Alg. 1
    if guidance_grad is not None:
        mean = mean + sigma_sq * guidance_grad
    # 4. add noise with the chosen variance (none at t = 0: Alg. 2, line 3)
    if t == 0:
        return StepOutput(mean, x0_pred)
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return StepOutput(mean + sigma_sq.sqrt() * noise, x0_pred)


class DDIMCoefficients(NamedTuple):
    """The scalars of one DDIM step t -> t_prev (0-d tensors on the schedule's device)."""

    sqrt_alpha_bar_prev: torch.Tensor  # sqrt(alpha_bar_{t_prev})
    direction: torch.Tensor  # sqrt(1 - alpha_bar_{t_prev} - sigma_t^2)
    sigma: torch.Tensor  # sigma_t(eta), Eq. (16)


def ddim_coefficients(schedule: NoiseSchedule, t: int, t_prev: int, eta: float) -> DDIMCoefficients:
    """Song et al. 2021 (DDIM), Eqs. (12) and (16), for one pair (t, t_prev).

    1 - alpha_bar and 1 - alpha_bar_t / alpha_bar_prev are differences of numbers near 1 at
    small t, where float32 alpha_bar would lose ~1e-3 of their value: they are formed with
    expm1 from log alpha_bar, which float32 holds to full relative precision there.
    """
    log_ab = schedule.log_alphas_cumprod[t]
    log_ab_prev = schedule.log_alphas_cumprod[t_prev] if t_prev >= 0 else log_ab.new_zeros(())
    one_minus_ab, one_minus_ab_prev = -torch.expm1(log_ab), -torch.expm1(log_ab_prev)
    sigma = eta * (one_minus_ab_prev / one_minus_ab * -torch.expm1(log_ab - log_ab_prev)).sqrt()
    return DDIMCoefficients(
        sqrt_alpha_bar_prev=(0.5 * log_ab_prev).exp(),
        direction=(one_minus_ab_prev - sigma**2).clamp(min=0).sqrt(),
        sigma=sigma,
    )


def ddim_step(
    schedule: NoiseSchedule,
    eps_pred: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_grad: torch.Tensor | None = None,
) -> StepOutput:
    """One DDIM step x_t -> x_{t_prev}, Song et al. 2021 (DDIM), Eq. (12).

    t_prev < t may skip steps; t_prev = -1 means "to x_0" (alpha_bar = 1). eta = 0 is
    deterministic DDIM, eta = 1 is DDPM with sigma^2 = beta_tilde. When x0 is clipped, eps is
    recomputed from the clipped x0 so that both terms of Eq. (12) agree (as improved-diffusion
    does; diffusers' `use_clipped_model_output=True`).
    `guidance_grad` g (B, C, H, W), e.g. s * grad log p(y | x_t): eps_pred is replaced by
    eps_pred - sqrt(1 - alpha_bar_t) g before anything else (Dhariwal & Nichol 2021, Alg. 2).
    """
    coef = ddim_coefficients(schedule, t, t_prev, eta)
    # 0. classifier guidance, as a shift of the predicted noise: Dhariwal & Nichol 2021, Alg. 2
    if guidance_grad is not None:
        eps_pred = eps_pred - schedule.sqrt_one_minus_alphas_cumprod[t] * guidance_grad
    # 1. predict x0 from eps: DDIM Eq. (12), "predicted x0" (= Ho et al. 2020, Eq. (15))
    x0_pred = predict_x0_from_eps(schedule, x_t, t, eps_pred)
    # 2. clip x0 to [-1, 1] and make eps consistent with it
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
        eps_pred = predict_eps_from_x0(schedule, x_t, t, x0_pred)
    # 3. x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps: Eq. (12)
    x_prev = coef.sqrt_alpha_bar_prev * x0_pred + coef.direction * eps_pred
    # 4. + sigma_t z, with sigma_t(eta) of Eq. (16); zero for eta = 0 and at the last step
    if eta > 0 and t_prev >= 0:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = x_prev + coef.sigma * noise
    return StepOutput(x_prev, x0_pred)


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: SpacingName = "uniform") -> list[int]:
    """The S timesteps tau_0 < ... < tau_{S-1} that DDIM visits (Song et al. 2021, Sec. 4.2).

    "uniform": tau_i = floor(i * T / S), the paper's linear tau_i = floor(c i).
    "quadratic": tau_i = floor(c i^2) with tau_{S-1} = floor(0.8 T), as in the authors' code
    (used for CIFAR-10, Appendix D.2). Where rounding would repeat a step (small i, large S),
    it is moved up by one, so that there are always exactly S distinct steps.
    """
    check_choice(spacing, SpacingName, "spacing")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be between 1 and T = {num_timesteps}, got {num_steps}")
    if spacing == "uniform":
        return [i * num_timesteps // num_steps for i in range(num_steps)]
    c = 0.8 * num_timesteps / max(num_steps - 1, 1) ** 2
    steps: list[int] = []
    for i in range(num_steps):
        tau = int(math.floor(c * i * i + 1e-9))
        steps.append(max(tau, steps[-1] + 1) if steps else tau)
    return steps


def timestep_pairs(num_timesteps: int, sampler: SamplerName = "ddpm", num_steps: int | None = None,
                   spacing: SpacingName = "uniform") -> list[tuple[int, int]]:
    """The (t, t_prev) steps a sampler takes, from the noisiest: DDPM [(T-1, T-2), ..., (0, -1)],
    DDIM [(tau_{S-1}, tau_{S-2}), ..., (tau_0, -1)] with S = `num_steps` (None: DDIM_STEPS)."""
    check_choice(sampler, SamplerName, "sampler")
    if sampler == "ddpm":
        if num_steps not in (None, num_timesteps):
            raise ValueError(f"the DDPM sampler takes all T = {num_timesteps} steps; "
                             f"use sampler='ddim' for {num_steps} steps")
        return [(t, t - 1) for t in reversed(range(num_timesteps))]
    taus = ddim_timesteps(num_timesteps, DDIM_STEPS if num_steps is None else num_steps, spacing)
    return list(zip(reversed(taus), [*reversed(taus[:-1]), -1]))


# guidance(x_t, t (B,)) -> g (B, C, H, W), e.g. s * grad log p(y | x_t); see ddpm_core.guidance
GuidanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()  # not inference_mode: guidance takes gradients (under enable_grad) in the loop
def sample(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    sampler: SamplerName = "ddpm",
    num_steps: int | None = None,
    variance: VarianceName = "fixedlarge",
    eta: float = 0.0,
    spacing: SpacingName = "uniform",
    clip_denoised: bool = True,
    amp: bool = False,
    y: torch.Tensor | None = None,
    x_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    guidance: GuidanceFn | None = None,
    trajectory_steps: Iterable[int] | None = None,
    t_start: int | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Draw x_0 of `shape` from x_T ~ N(0, I): the module docstring's loop, for either sampler.

    The sampler settings are `SamplerConfig`'s (checked by it): "ddpm" takes all T steps of
    Ho et al. 2020, Alg. 2 with `variance`; "ddim" takes S = `num_steps` (default 50) steps of
    Song et al. 2021 with `eta` and `spacing`. amp: the model under bfloat16 autocast (GPUs;
    the step arithmetic stays float32). y: class labels (B,) for a class-conditional model.
    generator: drives every random draw (it must live on `device`, which defaults to the
    model's). guidance: called on (x_t, t) at every step; its result is the step's
    `guidance_grad`. trajectory_steps: the t at which to keep x_t and x0_pred (for pictures).
    t_start: begin at step t_start from `x_T`, which then holds that step's x_t (a latent to
    continue from: Ho et al. 2020, Fig. 7); it must be a step the sampler visits.
    """
    SamplerConfig(sampler, num_steps, variance, eta, spacing, clip_denoised, amp)  # refuses bad settings
    pairs = timestep_pairs(schedule.num_timesteps, sampler, num_steps, spacing)
    if t_start is not None:
        pairs = _pairs_from(pairs, t_start, x_T)
    if device is None:
        device = next(iter(model.parameters())).device if isinstance(model, torch.nn.Module) else "cpu"
    device = torch.device(device)
    schedule = schedule.to(device)
    x = (torch.randn(tuple(shape), generator=generator, device=device) if x_T is None else x_T).to(device)
    y = y.to(device) if y is not None else None
    keep, recorded = set(trajectory_steps or ()), []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    with eval_mode(model):
        for t, t_prev in progress_bar(pairs, desc="sampling", disable=not progress, leave=False):
            t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            with autocast:
                eps_pred = model(x, t_batch, y).float()
            grad = guidance(x, t_batch) if guidance is not None else None
            if sampler == "ddpm":
                step = ddpm_step(schedule, eps_pred, x, t, variance, clip_denoised, generator=generator,
                                 guidance_grad=grad)
            else:
                step = ddim_step(schedule, eps_pred, x, t, t_prev, eta, clip_denoised, generator=generator,
                                 guidance_grad=grad)
            if t in keep:
                recorded.append((t, x.cpu(), step.x0_pred.cpu()))
            x = step.x_prev
    return SampleOutput(x, _trajectory(recorded, x.shape) if keep else None)


def _pairs_from(pairs: list[tuple[int, int]], t_start: int, x_t: torch.Tensor | None) -> list[tuple[int, int]]:
    """The sampler's steps from t_start down; refuses a t_start it never visits, or no x_t."""
    visited = [t for t, _ in pairs]
    if t_start not in visited:
        shown = "every t from 0 to T - 1" if len(visited) == visited[0] + 1 else f"one of {sorted(visited)[:8]} ..."
        raise ValueError(f"t_start={t_start} is not a step this sampler visits: use {shown}, or sampler='ddpm'")
    if x_t is None:
        raise ValueError(f"t_start={t_start} continues from a given latent: pass x_T=x_t, that step's input")
    return pairs[visited.index(t_start):]


def _trajectory(recorded: list[tuple[int, torch.Tensor, torch.Tensor]], shape: torch.Size) -> Trajectory:
    """The (t, x_t, x0_pred) kept along the way, stacked."""
    if not recorded:
        return Trajectory([], torch.empty(0, *shape), torch.empty(0, *shape))
    return Trajectory([t for t, _, _ in recorded], torch.stack([x_t for _, x_t, _ in recorded]),
                      torch.stack([x0 for _, _, x0 in recorded]))


@contextlib.contextmanager
def eval_mode(model: Denoiser):
    """Put a module in eval mode (no dropout) for the loop, then restore its mode."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def ddpm_sample(model: Denoiser, schedule: NoiseSchedule, shape: Sequence[int], variance: VarianceName = "fixedlarge",
                clip_denoised: bool = True, **options) -> SampleOutput:
    """`sample` with all T ancestral steps (Ho et al. 2020, Alg. 2); `options` are sample's."""
    return sample(model, schedule, shape, "ddpm", variance=variance, clip_denoised=clip_denoised, **options)


def ddim_sample(model: Denoiser, schedule: NoiseSchedule, shape: Sequence[int], num_steps: int = DDIM_STEPS,
                eta: float = 0.0, spacing: SpacingName = "uniform", clip_denoised: bool = True,
                **options) -> SampleOutput:
    """`sample` with S = `num_steps` DDIM steps (Song et al. 2021, Eq. 12); `options` are sample's."""
    return sample(model, schedule, shape, "ddim", num_steps, eta=eta, spacing=spacing, clip_denoised=clip_denoised,
                  **options)
