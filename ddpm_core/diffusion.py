"""The forward process q and the training objective of Ho et al. 2020.

This module owns q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the x0 <- eps
reparametrisation and L_simple, with how its t is drawn and weighted. The coefficients come
from `ddpm_core.schedule`; the reverse process (sampling) lives in `ddpm_core.sampling`.

Notation (code name -> paper symbol; t is 0-indexed, index t is the paper's step t + 1):

| code name      | symbol                       | meaning                                     |
|----------------|------------------------------|---------------------------------------------|
| x0             | x_0                          | clean image, scaled to [-1, 1]              |
| x_t            | x_t                          | noised image at step t                      |
| x_prev         | x_{t-1}                      | one step less noisy                         |
| eps            | epsilon                      | the Gaussian noise that made x_t from x0    |
| eps_pred       | epsilon_theta(x_t, t)        | the model's prediction of eps               |
| x0_pred        | x_0 hat                      | x0 recovered from x_t and eps_pred, Eq. (15)|
| t              | t - 1 (0-indexed)            | LongTensor (B,), or one int for the batch   |

Equations used: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Eq. (4);
q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I), Eqs. (6)-(7);
x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), Eq. (15) rearranged;
L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2, Eq. (14).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from ddpm_core.schedule import NoiseSchedule, gather


class Denoiser(Protocol):
    """Anything that maps (x_t (B, C, H, W), t (B,), y (B,) or None) to eps_pred (B, C, H, W)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


class Posterior(NamedTuple):
    """q(x_{t-1} | x_t, x_0) = N(mean, variance I); each shaped to broadcast against x_t."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance_clipped: torch.Tensor


def q_sample(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in one step: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

    Ho et al. 2020, Eq. (4). x0 (B, C, H, W), t (B,) -> x_t (B, C, H, W). Pass `noise` to
    choose eps yourself, otherwise it is drawn from `generator`.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return (
        gather(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> Posterior:
    """Mean and variance of q(x_{t-1} | x_t, x_0), Ho et al. 2020, Eqs. (6)-(7).

    mu_tilde = coef1 * x0 + coef2 * x_t, variance beta_tilde_t. x0, x_t (B, C, H, W), t (B,).
    """
    mean = (
        gather(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
        + gather(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    return Posterior(
        mean=mean,
        variance=gather(schedule.posterior_variance, t, x_t.ndim),
        log_variance_clipped=gather(schedule.posterior_log_variance_clipped, t, x_t.ndim),
    )


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    """x0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps: Eq. (4) solved for x0
    (the x0 hat of Ho et al. 2020, Eq. (15)). Shapes (B, C, H, W), t (B,)."""
    return (
        gather(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
    """The inverse of `predict_x0_from_eps`: eps = (x_t / sqrt(alpha_bar_t) - x0) / sqrt(1 / alpha_bar_t - 1)."""
    return (gather(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / gather(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def sample_timesteps(
    batch_size: int, num_timesteps: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """t ~ Uniform{0, ..., T - 1} (B,): all T steps, as in Ho et al. 2020, Alg. 1 line 3
    (the paper's Uniform{1, ..., T}, 0-indexed). Never `randint(1, T)`, which skips a step."""
    return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)


class LossAwareTimesteps:
    """Importance sampling of t by loss (Nichol & Dhariwal 2021, Sec. 3.3): the training loss's
    estimator, not the loss itself.

    Each step t keeps its last `history` per-sample losses L_t. Until every t holds that many, t is
    uniform (`sample_timesteps`, the same draws). Then t ~ p_t with
    p_t = (1 - u) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + u / T (u = `uniform_share`), and each
    sample's loss is weighted by 1 / (T p_t), so that E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t:
    the uniform-t objective, drawn where its terms are large and vary most (lower variance).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_share: float = 1e-3):
        if num_timesteps < 1 or history < 1 or not 0.0 < uniform_share <= 1.0:
            raise ValueError(f"LossAwareTimesteps needs num_timesteps >= 1, history >= 1 and 0 < uniform_share <= 1; "
                             f"got {num_timesteps}, {history}, {uniform_share}")
        self.num_timesteps, self.history, self.uniform_share = num_timesteps, history, uniform_share
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)  # a ring buffer per t
        self.seen = torch.zeros(num_timesteps, dtype=torch.long)  # losses recorded at t, ever

    @property
    def warm(self) -> bool:
        """Whether every t holds `history` losses (before that, t is uniform)."""
        return bool((self.seen >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t (T,), float64, summing to 1."""
        if not self.warm:
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        root_mean_square = self.losses.square().mean(1).sqrt()
        return (1.0 - self.uniform_share) * root_mean_square / root_mean_square.sum() \
            + self.uniform_share / self.num_timesteps

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """t (B,) ~ p_t."""
        if not self.warm:
            return sample_timesteps(batch_size, self.num_timesteps, device, generator)
        p = self.probabilities()
        if torch.device(device).type == "mps":  # no float64 there
            p = p.float()
        return torch.multinomial(p.to(device), batch_size, replacement=True, generator=generator)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """1 / (T p_t) (B,), float32, on t's device: 1 everywhere while t is uniform."""
        p = self.probabilities()[t.cpu()]  # float64 on the CPU, on every device alike
        return (1.0 / (self.num_timesteps * p)).float().to(t.device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record each sample's loss at its t, in batch order (the oldest of a full t is dropped)."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            seen = int(self.seen[step])
            self.losses[step, seen % self.history] = loss
            self.seen[step] = seen + 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["losses"].shape != self.losses.shape or state["seen"].shape != self.seen.shape:
            raise RuntimeError(f"a loss history of shape {tuple(state['losses'].shape)}, not "
                               f"{tuple(self.losses.shape)} (T = {self.num_timesteps}, {self.history} losses a step)")
        self.losses = state["losses"].double().cpu().clone()
        self.seen = state["seen"].long().cpu().clone()


def timestep_weights(schedule: NoiseSchedule, t: torch.Tensor, weighting: str = "uniform",
                     min_snr_gamma: float = 5.0, p2_gamma: float = 1.0) -> torch.Tensor:
    """The weight w_t (B,) of each sample's eps-MSE, with SNR_t = alpha_bar_t / (1 - alpha_bar_t).

    "uniform": 1, L_simple itself. "min_snr" (Hang et al. 2023): min(SNR_t, gamma) / SNR_t,
    the x0-MSE's weight clipped at gamma and rewritten for eps: 1 where SNR_t <= gamma (the
    noisy steps), gamma / SNR_t at the cleaner ones. "p2" (Choi et al. 2022, k = 1):
    1 / (1 + SNR_t) ** gamma, which also turns down the steps that only remove imperceptible
    noise. Neither changes what the network predicts, so the samplers are unchanged.
    """
    snr = schedule.snr(t)  # only the batch's steps: this runs every training step
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        return torch.clamp(snr, max=min_snr_gamma) / snr
    if weighting == "p2":
        return (1.0 + snr) ** -p2_gamma
    raise ValueError(f"unknown loss weighting {weighting!r}; valid choices: uniform, min_snr, p2")


def loss_simple(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_simple, the unweighted eps-MSE of Ho et al. 2020, Eq. (14) and Alg. 1. Returns a scalar.

    x0 (B, C, H, W) in [-1, 1]; t (B,) and noise default to fresh uniform steps and N(0, I).
    With `weights` (B,) (`timestep_weights`), the batch mean of w_t times each sample's MSE.
    """
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, x0.device, generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise=noise)
    eps_pred = model(x_t, t, y)
    if weights is None:
        return F.mse_loss(eps_pred.float(), noise.float())
    per_sample = (eps_pred.float() - noise.float()).square().flatten(1).mean(1)  # (B,)
    return (weights * per_sample).mean()
