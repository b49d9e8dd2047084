"""The variational bound of Ho et al. 2020 in bits per dimension, term by term, and what it
says about lossy compression (Sec. 4.3).

This module owns L = L_T + sum_{t=2}^{T} L_{t-1} + L_0 (Ho et al. 2020, Eq. (5)): the
Gaussian KL between two diagonal Gaussians, the discretised Gaussian decoder of Eq. (13), the
prior term, and the loop that evaluates every term for a batch of test images. Training on the
bound is `ddpm_core.objectives`'s; sampling is `ddpm_core.sampling`'s.

Indexing: `Bound.terms[:, t]` is the paper's L_t for the 0-indexed t of this project, so
column 0 is the decoder L_0 = -log p(x_0 | x_1) and column t >= 1 is
L_t = KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})) in the paper's 1-indexed x (our step t's
input is the paper's x_{t+1}). L_T, the prior term, is `Bound.prior`.

Precision: the network runs in float32 (as it was trained); everything after it runs in
float64, so that no difference formed at run time loses digits: at the first steps 1 -
alpha_bar_t is a difference of numbers within 2e-4 of 1 (float32 alpha_bar gives 1 -
alpha_bar_1 to about 1e-4 relative), and the KL divides the squared difference of two
posterior means, O(1) numbers that agree to about 1e-2, by beta_tilde_t (5.5e-5 at t = 1).
Because the schedule's stored coefficients are themselves derived in float64, the same terms
in float32 agree with these to about 1e-5 relative on the laptop model (t = 0 to 100,
measured): float64 is the safe choice, not a large correction. The float64 coefficients are
derived from the schedule's betas (float64 -> float32 -> float64 changes them by ~1e-7
relative).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ddpm_core.config import VarianceName, check_choice
from ddpm_core.diffusion import Denoiser, predict_x0_from_eps, q_posterior, q_sample
from ddpm_core.runtime import progress_bar
from ddpm_core.sampling import eval_mode
from ddpm_core.schedule import NoiseSchedule, gather

LOG2 = math.log(2.0)
HALF_BIN = 1.0 / 255.0  # pixels k in {0..255} map to 2k/255 - 1: bins 2/255 wide in [-1, 1]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats.

    0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) - 1 + (mean1 - mean2)^2 / exp(logvar2)),
    with exp(d) - 1 - d written as expm1(d) - d, which keeps its digits when the variances are
    close (they are equal for sigma_t^2 = beta_tilde_t)."""
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_cdf_difference(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, without cancellation: a bin in the
    upper tail is mirrored into the lower one (Phi(u) - Phi(l) = Phi(-l) - Phi(-u)), where
    log Phi is exact, and log(1 - exp(a - b)) is formed with expm1."""
    mirror = lower > 0
    lo, hi = torch.where(mirror, -upper, lower), torch.where(mirror, -lower, upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x0) per element under N(mean, exp(log_scale)^2) integrated over x0's pixel bin:
    Ho et al. 2020, Eq. (13). x0 holds pixel values 2k/255 - 1; the bin of x0 is
    [x0 - 1/255, x0 + 1/255], except that the first reaches down to -inf and the last up to
    +inf, so the 256 probabilities of a pixel sum to 1."""
    inv_scale = torch.exp(-log_scale)
    lower, upper = (x0 - HALF_BIN - mean) * inv_scale, (x0 + HALF_BIN - mean) * inv_scale
    return torch.where(x0 < -1 + HALF_BIN, torch.special.log_ndtr(upper),    # Phi(upper) - 0
           torch.where(x0 > 1 - HALF_BIN, torch.special.log_ndtr(-lower),   # 1 - Phi(lower)
                       _log_cdf_difference(lower, upper)))


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """Per-element nats (B, ...) -> bits per dimension of each image (B,)."""
    return nats.flatten(1).mean(1) / LOG2


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim (B,): nothing to learn, and ~1e-5 for the
    paper's schedule, since alpha_bar_T ~ 4e-5 leaves almost no trace of x_0 in x_T."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean = gather(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    logvar = torch.log(gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) ** 2)
    return mean_bits(normal_kl(mean, logvar.expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean)))


def reverse_log_variance(schedule: NoiseSchedule, variance: VarianceName) -> torch.Tensor:
    """log sigma_t^2 of p(x_{t-1} | x_t), shape (T,). "fixedsmall": log beta_tilde_t (clipped at
    t = 0, where beta_tilde is 0). "fixedlarge": log beta_t, except beta_tilde_1 at t = 0, as
    in Ho et al.'s code ("to get a better decoder log likelihood"); the sampler adds no noise at
    t = 0, so both samplers are the ones `ddpm_step` runs."""
    check_choice(variance, VarianceName, "variance")
    if variance == "fixedsmall":
        return schedule.posterior_log_variance_clipped
    return torch.log(torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]))


class ReverseStep(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, exp(log_variance)) and the x0 it was formed from."""

    mean: torch.Tensor
    log_variance: torch.Tensor
    x0_pred: torch.Tensor


def p_mean_variance(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    variance: VarianceName = "fixedlarge", clip_denoised: bool = True) -> ReverseStep:
    """The model's Gaussian for x_{t-1}, as `sampling.ddpm_step` draws from it: x0 from eps
    (Eq. (15)), clipped to [-1, 1] if asked, then the posterior mean of Eq. (7)."""
    x0_pred = predict_x0_from_eps(schedule, x_t, t, eps_pred)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    mean = q_posterior(schedule, x0_pred, x_t, t).mean
    log_variance = gather(reverse_log_variance(schedule, variance), t, x_t.ndim).expand_as(mean)
    return ReverseStep(mean, log_variance, x0_pred)


def vb_terms_bpd(schedule: NoiseSchedule, step: ReverseStep, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """Each image's term of the bound at its step t, in bits/dim (B,): the decoder's
    -log p(x_0 | x_1) (Eq. (13)) where t = 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
    between the posterior of Eqs. (6)-(7) and `step`, the model's Gaussian."""
    true = q_posterior(schedule, x0, x_t, t)
    kl = mean_bits(normal_kl(true.mean, true.log_variance_clipped.expand_as(true.mean), step.mean, step.log_variance))
    decoder_nll = -mean_bits(discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance))
    return torch.where(t == 0, decoder_nll, kl)


class Bound(NamedTuple):
    """The variational bound of a batch of images, in bits/dim."""

    total: torch.Tensor  # (B,): L_T + L_{T-1} + ... + L_0, the negative log-likelihood bound
    prior: torch.Tensor  # (B,): L_T
    terms: torch.Tensor  # (B, T): terms[:, t] is the paper's L_t (column 0: the decoder L_0)
    x0_mse: torch.Tensor  # (B, T): mean squared error of x0_pred from x_t, in [-1, 1] units


@torch.no_grad()
def variational_bound(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor,
                      variance: VarianceName = "fixedlarge", clip_denoised: bool = True,
                      y: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      progress: bool = False) -> Bound:
    """Every term of the bound for images x0 (B, C, H, W) with pixel values 2k/255 - 1.

    One forward pass per t for the whole batch (T in all), from t = T - 1 down to 0, each at a
    fresh x_t ~ q(x_t | x_0) drawn from `generator`: an unbiased estimate of each KL term, as
    in improved-diffusion's calc_bpd_loop. `variance` and `clip_denoised` choose the reverse
    process p whose likelihood is bounded: the one `sampling.ddpm_step` samples with the same
    settings. y: class labels for a class-conditional model."""
    device = x0.device
    s64 = NoiseSchedule.from_betas(schedule.betas.double(), torch.float64).to(device)
    x0 = x0.double()
    num_timesteps = s64.num_timesteps
    terms = torch.zeros(x0.shape[0], num_timesteps, dtype=torch.float64, device=device)
    x0_mse = torch.zeros_like(terms)
    steps = progress_bar(reversed(range(num_timesteps)), total=num_timesteps, desc="bound, t = T..1",
                         disable=not progress, leave=False)
    with eval_mode(model):
        for t in steps:
            t_batch = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float64)
            x_t = q_sample(s64, x0, t_batch, noise=noise)
            eps_pred = model(x_t.float(), t_batch, y).double()  # the network in float32, the rest in float64
            step = p_mean_variance(s64, eps_pred, x_t, t_batch, variance, clip_denoised)
            terms[:, t] = vb_terms_bpd(s64, step, x0, x_t, t_batch)
            x0_mse[:, t] = (step.x0_pred - x0).square().flatten(1).mean(1)
    prior = prior_bpd(s64, x0)
    return Bound(prior + terms.sum(1), prior, terms, x0_mse)


class RateDistortion(NamedTuple):
    """Progressive lossy compression (Ho et al. 2020, Sec. 4.3, Alg. 3-4, Fig. 5), per step t."""

    timesteps: torch.Tensor  # (T,): t, 0-indexed; x_t is the receiver's latent
    rate: torch.Tensor  # (T,) bits/dim sent before the receiver holds x_t: L_T + sum_{s > t} L_s
    distortion: torch.Tensor  # (T,) RMSE of the x0 predicted from x_t, on the 0-255 scale


def rate_distortion(bound: Bound) -> RateDistortion:
    """The rate and distortion of sending x_T, x_{T-1}, ... and stopping at x_t, averaged over
    the bound's images. The rate is cumulative: the prior, then each KL term down to step t + 1
    (the bits that x_{t+1} -> x_t costs); the receiver's guess of x_0 is the model's x0_pred."""
    terms = bound.terms.mean(0)  # (T,)
    received = terms.flip(0).cumsum(0).flip(0) - terms  # sum_{s > t} terms[s]
    rmse = bound.x0_mse.mean(0).sqrt() * 127.5  # [-1, 1] -> [0, 255]
    return RateDistortion(torch.arange(len(terms)), bound.prior.mean() + received, rmse)


def bound_report(bound: Bound) -> dict:
    """The numbers the README and `ddpm evaluate --nll` report, as plain floats (bits/dim).

    rate and distortion are Ho et al.'s Sec. 4.3 split of the same total: L_T + ... + L_1 (the
    bits of the lossy code) and L_0 (the decoder's, what a lossless code adds)."""
    n = bound.total.shape[0]
    terms = bound.terms.mean(0)
    steps = bound.terms.shape[1]
    spans = [(0, 0), (1, 9), (10, 99), (100, 999)]
    where = {f"L_{a}" if a == b else f"L_{a}..L_{min(b, steps - 1)}": float(terms[a:b + 1].sum())
             for a, b in spans if a < steps}
    return {
        "bits_per_dim": float(bound.total.mean()),
        "bits_per_dim_stderr": float(bound.total.std() / math.sqrt(n)) if n > 1 else None,
        "prior_L_T": float(bound.prior.mean()),
        "decoder_L_0": float(terms[0]),
        "kl_terms": float(terms[1:].sum()),
        "rate": float(bound.prior.mean() + terms[1:].sum()),
        "distortion": float(terms[0]),
        "final_rmse_0_255": float(rate_distortion(bound).distortion[0]),
        "terms_by_t": where,
        "num_images": n,
    }
