"""What the network predicts and what it is trained on: Ho et al. 2020, Table 2.

This module owns the three parameterisations of the reverse-process mean (eps, as the paper's
final model; mu_tilde itself; x_0) and the two objectives (L_simple, the unweighted MSE of the
prediction; and the true variational bound L with fixed isotropic Sigma), and the adapter that
makes any of these networks look like an eps predictor, so that the samplers, guidance and the
bound (`ddpm_core.likelihood`) are the same for all of them. The eps / L_simple pair is
`diffusion.loss_simple` exactly.

| prediction | network output          | "simple" objective          | Ho et al. 2020 |
|------------|-------------------------|-----------------------------|----------------|
| eps        | eps_theta(x_t, t)       | ||eps - eps_theta||^2         | Eq. (14)       |
| mu         | mu_theta(x_t, t)        | ||mu_tilde - mu_theta||^2     | Eq. (8), unweighted |
| x0         | x0_theta(x_t, t)        | ||x_0 - x0_theta||^2          | Sec. 3.2       |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.config import ModelConfig, Objective, Prediction, TrainConfig, VarianceName, check_choice
from ddpm_core.diffusion import (Denoiser, loss_simple, predict_eps_from_x0, predict_x0_from_eps, q_posterior, q_sample,
                                 sample_timesteps)
from ddpm_core.likelihood import ReverseStep, reverse_log_variance, vb_terms_bpd
from ddpm_core.schedule import NoiseSchedule, gather


def x0_from_mean(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor | int, mean: torch.Tensor) -> torch.Tensor:
    """Eq. (7) solved for x_0: mu = coef1 x_0 + coef2 x_t, so x_0 = (mu - coef2 x_t) / coef1
    (coef1 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) > 0 at every t; 1 at t = 0)."""
    return (mean - gather(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t) / gather(
        schedule.posterior_mean_coef1, t, x_t.ndim)


def eps_from_prediction(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor | int, output: torch.Tensor,
                        prediction: Prediction) -> torch.Tensor:
    """The eps that a network of parameterisation `prediction` implies at (x_t, t)."""
    check_choice(prediction, Prediction, "prediction")
    if prediction == "eps":
        return output
    x0 = output if prediction == "x0" else x0_from_mean(schedule, x_t, t, output)
    return predict_eps_from_x0(schedule, x_t, t, x0)


class EpsFromPrediction(nn.Module):
    """A network that predicts x_0 or mu_tilde, seen as the eps predictor the samplers take.
    Its parameters are the network's (`self.net`); build it only to sample or evaluate."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: Prediction):
        super().__init__()
        check_choice(prediction, Prediction, "prediction")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.schedule = self.schedule.to(x_t.device)  # moved once, on the first call on a device
        return eps_from_prediction(self.schedule, x_t, t, self.net(x_t, t, y).float(), self.prediction)


def as_eps_denoiser(net: nn.Module, config: ModelConfig, schedule: NoiseSchedule) -> nn.Module:
    """`net` itself when it predicts eps, else wrapped in `EpsFromPrediction`."""
    return net if config.prediction == "eps" else EpsFromPrediction(net, schedule, config.prediction)


def objective_name(model: ModelConfig, train: TrainConfig) -> str | None:
    """What a run's training loss is, for a plot's legend; None for eps with L_simple, which the
    loss curve names itself (with its timestep weighting)."""
    if train.objective == "vlb":
        return "the bound's terms, bits/dim"
    return {"eps": None, "x0": "MSE of x0", "mu": "MSE of mu_tilde"}[model.prediction]


def reverse_step(schedule: NoiseSchedule, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 prediction: Prediction, variance: VarianceName) -> ReverseStep:
    """The model's p(x_{t-1} | x_t) from its raw output, unclipped (training)."""
    if prediction == "mu":
        mean, x0_pred = output, x0_from_mean(schedule, x_t, t, output)
    else:
        x0_pred = output if prediction == "x0" else predict_x0_from_eps(schedule, x_t, t, output)
        mean = q_posterior(schedule, x0_pred, x_t, t).mean
    log_variance = gather(reverse_log_variance(schedule, variance), t, x_t.ndim).expand_as(mean)
    return ReverseStep(mean, log_variance, x0_pred)


def training_loss(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor, prediction: Prediction = "eps",
                  objective: Objective = "simple", y: torch.Tensor | None = None, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                  variance: VarianceName = "fixedlarge", per_sample: bool = False) -> torch.Tensor:
    """One of Table 2's objectives on a batch x0 (B, C, H, W), with t (B,) and noise given or
    drawn; returns a scalar. `model` is the raw network (its output is `prediction`).

    "simple": the unweighted MSE between the network's output and its target (eps, mu_tilde or
    x_0), with the optional per-sample `weights` (`diffusion.timestep_weights`). For eps this
    is `loss_simple`, bit for bit. "vlb": the true bound, each sample's term L_t in bits/dim
    (`likelihood.vb_terms_bpd`: the KL to the posterior at t > 0, the discretised decoder at
    t = 0) with sigma_t^2 fixed by `variance`, averaged over the batch: 1/T of the Monte Carlo
    estimate of L - L_T (L_T has no parameters). With `per_sample`, each sample's (weighted)
    term (B,) instead of their mean (what `diffusion.LossAwareTimesteps` records)."""
    check_choice(prediction, Prediction, "prediction")
    check_choice(objective, Objective, "objective")
    if prediction == "eps" and objective == "simple" and not per_sample:
        return loss_simple(model, schedule, x0, y, t=t, noise=noise, weights=weights)
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, t, noise=noise)
    output = model(x_t, t, y).float()
    if objective == "vlb":
        terms = vb_terms_bpd(schedule, reverse_step(schedule, output, x_t, t, prediction, variance), x0, x_t, t)
    else:
        target = {"eps": noise, "x0": x0}.get(prediction)
        if target is None:
            target = q_posterior(schedule, x0, x_t, t).mean
        if weights is None and not per_sample:
            return F.mse_loss(output, target.float())
        terms = (output - target.float()).square().flatten(1).mean(1)
    if weights is not None:
        terms = weights * terms
    return terms if per_sample else terms.mean()
