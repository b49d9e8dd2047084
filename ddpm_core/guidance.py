"""Guidance: steering the sampler towards a chosen class.

This module owns the two ways of doing so. Classifier guidance (Dhariwal & Nichol 2021)
adds the gradient of a noise-aware classifier's log p_phi(y | x_t) to each reverse step of an
unconditional model; the steps themselves take it as `guidance_grad` (`ddpm_step` shifts the
mean, `ddim_step` the predicted noise). Classifier-free guidance (Ho & Salimans 2022) mixes
the predictions of one class-conditional model with and without its label. The classifier
is `ddpm_core.classifier`'s; the samplers are `ddpm_core.sampling`'s; drawing guided images
from a checkpoint is `ddpm_core.generation`'s.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddpm_core.classifier import NoisyClassifier
from ddpm_core.sampling import GuidanceFn


def classifier_grad(classifier: NoisyClassifier, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x_t, t) (B, C, H, W), for labels y (B,) chosen per sample.

    The gradient is taken at x_t, the point the classifier sees and was trained on (noised
    images at level t), as guided-diffusion does. Dhariwal & Nichol's derivation expands
    log p around the step's mean mu instead; the authors found the difference immeasurable
    (guided-diffusion issue #51) and x_t needs no second pass of the model. Summing the
    log-probabilities over the batch is exact: sample i's term depends on x_t[i] only, so the
    gradient of the sum holds each sample's own gradient.
    """
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        log_probs = classifier(x, t).float().log_softmax(dim=1)  # (B, num_classes)
        selected = log_probs[torch.arange(len(y), device=y.device), y]  # (B,)
        return torch.autograd.grad(selected.sum(), x)[0]


def classifier_guidance(classifier: NoisyClassifier, y: torch.Tensor, scale: float) -> GuidanceFn:
    """The `guidance` argument of the samplers: (x_t, t) -> scale * grad log p_phi(y | x_t, t).

    scale s > 1 sharpens the class distribution to p(y | x_t)^s (s = 0: unguided)."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"the guidance scale s must be a finite number >= 0 (0: unguided), got {scale}")
    classifier.eval()

    def guidance(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * classifier_grad(classifier, x_t, t, y.to(x_t.device))

    return guidance


class ClassifierFreeGuidance(nn.Module):
    """eps = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null): Ho & Salimans 2022, Eq. (6).

    Wraps a class-conditional model trained with label dropout (`TrainConfig.label_dropout`),
    whose "null" label (y = None) is its unconditional half. w = 0 is plain conditional
    sampling. (Some codes write the same thing as lerp(uncond, cond, s) with s = 1 + w.)
    Both predictions come from one forward pass over the doubled batch.
    """

    def __init__(self, model: nn.Module, guidance_weight: float):
        super().__init__()
        num_classes = getattr(getattr(model, "config", None), "num_classes", None)
        if num_classes is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes set, "
                             "trained with label_dropout > 0)")
        if not (math.isfinite(guidance_weight) and guidance_weight >= 0):
            raise ValueError(f"the guidance weight w must be a finite number >= 0 (0: conditional only), "
                             f"got {guidance_weight}")
        self.model, self.num_classes, self.guidance_weight = model, num_classes, guidance_weight

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs the class labels y (B,)")
        null = torch.full_like(y, self.num_classes)  # the "no class" label
        eps_cond, eps_uncond = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        w = self.guidance_weight
        return (1 + w) * eps_cond - w * eps_uncond
