"""Noise schedules: the betas and every coefficient derived from them.

This module owns the numbers of the forward process (what to multiply by at step t); it does
not sample or apply them (see `ddpm_core.diffusion` and `ddpm_core.sampling`).

Timestep convention: t is 0-indexed. Index t is the paper's step t + 1, so `betas[0]` is the
paper's beta_1 and `alphas_cumprod[T - 1]` is alpha_bar_T. Everything is computed in float64
and stored as float32, as in Ho et al.'s code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ddpm_core.config import DiffusionConfig, ScheduleName, check_choice

MAX_BETA = 0.999


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Linear betas of Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over T = 1000 steps.

    For another T both ends are scaled by 1000 / T (as improved-diffusion does), so that a
    shorter chain still ends near pure noise: the sum of betas, and so alpha_bar_T, stays
    about the same. At T = 1000 this is exactly the paper's schedule. Since beta must stay
    below 1, the linear schedule needs T >= 21; use "cosine" for shorter chains.
    """
    scale = 1000.0 / num_timesteps
    beta_start, beta_end = scale * 1e-4, scale * 0.02
    if beta_end >= 1.0:
        raise ValueError(
            f"the linear schedule scales beta_T = 0.02 * 1000 / T to {beta_end:.3f} >= 1 at "
            f"T = {num_timesteps}; use T >= 21 or the cosine schedule"
        )
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t_over_T: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2) of Nichol & Dhariwal 2021, Eq. (17)."""
    return torch.cos((t_over_T + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cosine betas of Nichol & Dhariwal 2021 (improved DDPM), Sec. 3.2.

    alpha_bar(t) = f(t) / f(0); beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped at
    0.999 to avoid the singularity at t = T. In 0-indexed form
    beta[i] = 1 - f((i + 1) / T) / f(i / T); the ratio makes the division by f(0) cancel.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = cosine_alpha_bar(steps, s)
    return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


def make_betas(name: ScheduleName, num_timesteps: int) -> torch.Tensor:
    """The float64 betas of the named schedule."""
    check_choice(name, ScheduleName, "schedule")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps (T) must be at least 2, got {num_timesteps}")
    return {"linear": linear_betas, "cosine": cosine_betas}[name](num_timesteps)


@dataclass(frozen=True)
class NoiseSchedule:
    """Every per-timestep coefficient of the forward and reverse processes, shape (T,).

    Notation (code name -> Ho et al. 2020 symbol, 0-indexed t):

    | code name                      | symbol                                 | equation |
    |--------------------------------|----------------------------------------|----------|
    | betas                          | beta_t                                 | Eq. (2)  |
    | alphas                         | alpha_t = 1 - beta_t                   | Sec. 2   |
    | alphas_cumprod                 | alpha_bar_t = prod_{s<=t} alpha_s      | Eq. (4)  |
    | alphas_cumprod_prev            | alpha_bar_{t-1} (1 at t = 0)           | Eq. (7)  |
    | log_alphas_cumprod             | log alpha_bar_t (exact near 0, where alpha_bar_t ~ 1) | DDIM |
    | sqrt_alphas_cumprod            | sqrt(alpha_bar_t)                      | Eq. (4)  |
    | sqrt_one_minus_alphas_cumprod  | sqrt(1 - alpha_bar_t)                  | Eq. (4)  |
    | sqrt_recip_alphas_cumprod      | 1 / sqrt(alpha_bar_t)                  | Eq. (15) |
    | sqrt_recipm1_alphas_cumprod    | sqrt(1 / alpha_bar_t - 1)              | Eq. (15) |
    | posterior_variance             | beta_tilde_t                           | Eq. (7)  |
    | posterior_log_variance_clipped | log beta_tilde_t, with beta_tilde_1 at t = 0 | Eq. (7) |
    | posterior_mean_coef1           | beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) | Eq. (7) |
    | posterior_mean_coef2           | (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t) | Eq. (7) |
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    log_alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """Derive every coefficient from float64 betas, then store them as `dtype` (float32; the
        variational bound keeps float64, see `ddpm_core.likelihood`)."""
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D tensor of at least 2 values")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde at t = 0 is 0, so its log is clipped to beta_tilde at t = 1 (Ho et al.'s code).
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        )
        coefficients = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            log_alphas_cumprod=torch.cumsum(torch.log1p(-betas), dim=0),
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        )
        return cls(**{name: value.to(dtype) for name, value in coefficients.items()})

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> NoiseSchedule:
        return cls.from_betas(make_betas(config.schedule, config.num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy with every coefficient on `device` (itself if already there)."""
        if torch.device(device) == self.device:
            return self
        fields = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        return NoiseSchedule(**fields)

    def snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t): shape (T,), or at the steps `t`
        only (a training batch's, without computing all T)."""
        alpha_bar = self.alphas_cumprod if t is None else self.alphas_cumprod[t]
        return alpha_bar / (1.0 - alpha_bar)


def gather(coefficient: torch.Tensor, t: torch.Tensor | int, ndim: int) -> torch.Tensor:
    """coefficient[t] for a batch of timesteps t (B,), shaped (B, 1, ..., 1) to broadcast
    against a tensor of `ndim` dimensions; for one int t (as in a sampling loop), a 0-d tensor."""
    if isinstance(t, int):
        return coefficient[t]
    values = coefficient.to(t.device)[t]  # (B,)
    return values.view(-1, *([1] * (ndim - 1)))
