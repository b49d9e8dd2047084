"""The variational bound in bits/dim (Ho et al. 2020, Eqs. (5), (13)) against closed forms,
torch.distributions, and an oracle denoiser that knows the data."""

import math

import pytest
import torch
from torch import nn

from ddpm_core.config import DiffusionConfig
from ddpm_core.diffusion import predict_eps_from_x0
from ddpm_core.likelihood import (
    bound_report, discretized_gaussian_log_likelihood, normal_kl, p_mean_variance, prior_bpd, rate_distortion,
    reverse_log_variance, variational_bound, vb_terms_bpd,
)
from ddpm_core.schedule import NoiseSchedule


def pixels(*shape, generator=None) -> torch.Tensor:
    """Images of 8-bit pixel values k in the model's range, 2k/255 - 1, in float64."""
    k = torch.randint(0, 256, shape, generator=generator)
    return (2 * k / 255 - 1).double()


class Oracle(nn.Module):
    """The Bayes-optimal eps predictor for a finite dataset: E[eps | x_t] from the posterior
    over the dataset's images, a Gaussian mixture with weights softmax(-|x_t - sqrt(ab) x0_i|^2
    / (2 (1 - ab)))."""

    def __init__(self, data: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.register_buffer("data", data.double())
        self.schedule = NoiseSchedule.from_betas(schedule.betas.double(), torch.float64)
        self.anchor = nn.Parameter(torch.zeros(()))  # for the device lookup

    def forward(self, x_t, t, y=None):
        x_t = x_t.double()
        ab = self.schedule.alphas_cumprod[t].view(-1, 1)  # (B, 1)
        flat, data = x_t.flatten(1), self.data.flatten(1)  # (B, D), (N, D)
        distance = ((flat[:, None, :] - ab.sqrt()[:, None] * data[None]) ** 2).sum(-1)  # (B, N)
        weights = torch.softmax(-distance / (2 * (1 - ab)), dim=1)
        x0 = (weights @ data).view_as(x_t)
        return predict_eps_from_x0(self.schedule, x_t, t, x0).float()


class Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, y=None):
        return torch.zeros_like(x_t)


@pytest.fixture(scope="module")
def short_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig("linear", 50))


def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean1, mean2 = torch.randn(2, 1000, generator=generator, dtype=torch.float64)
    logvar1, logvar2 = torch.randn(2, 1000, generator=generator, dtype=torch.float64) * 3
    logvar2[:100] = logvar1[:100] + 1e-9  # nearly equal variances: where exp(d) - 1 - d cancels
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean1, (0.5 * logvar1).exp()),
                                                 torch.distributions.Normal(mean2, (0.5 * logvar2).exp()))
    torch.testing.assert_close(normal_kl(mean1, logvar1, mean2, logvar2), expected, rtol=1e-9, atol=1e-12)


def test_normal_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    mean, logvar = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert normal_kl(mean, logvar, mean, logvar).abs().max() == 0
    assert (normal_kl(mean, logvar, mean + 0.1, logvar) > 0).all()
    assert (normal_kl(mean, logvar, mean, logvar + 0.1) > 0).all()


@pytest.mark.parametrize("mean, scale", [(0.0, 0.01), (0.3, 1e-4), (-0.9, 0.2), (1.7, 0.05), (-3.0, 2.0),
                                         (0.5, 30.0), (0.99, 1e-3)])
def test_decoder_probabilities_over_all_256_values_sum_to_1(mean, scale):
    x0 = (2 * torch.arange(256, dtype=torch.float64) / 255 - 1)
    log_p = discretized_gaussian_log_likelihood(x0, torch.full_like(x0, mean), torch.full_like(x0, math.log(scale)))
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-10)


def test_decoder_is_the_gaussian_mass_of_the_pixel_bin():
    generator = torch.Generator().manual_seed(3)
    x0 = pixels(2000, generator=generator)
    mean = x0 + 0.05 * torch.randn(2000, generator=generator, dtype=torch.float64)
    scale = torch.rand(2000, generator=generator, dtype=torch.float64) * 0.2 + 0.01
    normal = torch.distributions.Normal(mean, scale)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    log_p = discretized_gaussian_log_likelihood(x0, mean, scale.log())
    naive = upper - lower  # cancels to 0 far in a tail, where log_p must stay finite
    fine = naive > 1e-10
    assert fine.sum() > 1900 and torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p[fine], naive[fine].log(), rtol=1e-6, atol=1e-9)


def test_decoder_stays_finite_far_in_the_tails():
    x0 = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x0, torch.tensor([5.0, -5.0, 5.0], dtype=torch.float64),
                                                torch.full((3,), math.log(0.01), dtype=torch.float64))
    assert torch.isfinite(log_p).all() and (log_p < -1e4).all()


def test_prior_term_is_its_closed_form_and_about_1e_5_bits_for_the_papers_schedule(linear_schedule):
    x0 = pixels(16, 1, 28, 28)
    x0[:8] = -1.0  # MNIST: mostly black
    s64 = NoiseSchedule.from_betas(linear_schedule.betas.double(), torch.float64)
    ab = s64.alphas_cumprod[-1]
    # KL(N(sqrt(ab) x, 1 - ab) || N(0, 1)) = 0.5 (ab x^2 + (1 - ab) - 1 - log(1 - ab))
    expected = (0.5 * (ab * x0**2 - ab - torch.log1p(-ab))).flatten(1).mean(1) / math.log(2)
    prior = prior_bpd(s64, x0)
    torch.testing.assert_close(prior, expected, rtol=1e-9, atol=0)
    assert 2e-6 < prior.mean() < 5e-5  # the paper's "~1e-5 bits per dimension" (Sec. 4.1)


def test_kl_terms_match_torch_distributions_at_every_t(short_schedule):
    generator = torch.Generator().manual_seed(1)
    s64 = NoiseSchedule.from_betas(short_schedule.betas.double(), torch.float64)
    x0 = pixels(49, 1, 4, 4, generator=generator)
    t = torch.arange(1, 50)
    x_t = torch.randn(49, 1, 4, 4, generator=generator, dtype=torch.float64)
    eps_pred = torch.randn(49, 1, 4, 4, generator=generator, dtype=torch.float64)
    for variance in ("fixedlarge", "fixedsmall"):
        step = p_mean_variance(s64, eps_pred, x_t, t, variance, clip_denoised=False)
        coef1, coef2 = s64.posterior_mean_coef1[t].view(-1, 1, 1, 1), s64.posterior_mean_coef2[t].view(-1, 1, 1, 1)
        posterior = torch.distributions.Normal(coef1 * x0 + coef2 * x_t, s64.posterior_variance[t].sqrt().view(-1, 1, 1, 1))
        sigma_sq = (s64.betas if variance == "fixedlarge" else s64.posterior_variance)[t].view(-1, 1, 1, 1)
        model = torch.distributions.Normal(step.mean, sigma_sq.sqrt().expand_as(step.mean))
        expected = torch.distributions.kl_divergence(posterior, model).flatten(1).mean(1) / math.log(2)
        torch.testing.assert_close(vb_terms_bpd(s64, step, x0, x_t, t), expected, rtol=1e-7, atol=1e-12)


def test_fixedlarge_decoder_uses_beta_tilde_1_as_in_the_authors_code(linear_schedule):
    large = reverse_log_variance(linear_schedule, "fixedlarge")
    torch.testing.assert_close(large[0], linear_schedule.posterior_variance[1].log())
    torch.testing.assert_close(large[1:], linear_schedule.betas[1:].log())
    torch.testing.assert_close(reverse_log_variance(linear_schedule, "fixedsmall"),
                               linear_schedule.posterior_log_variance_clipped)
    with pytest.raises(ValueError, match="fixedlarge, fixedsmall"):
        reverse_log_variance(linear_schedule, "learned")


def test_an_oracle_denoiser_has_a_far_lower_bound_than_one_that_predicts_zero(short_schedule):
    data = pixels(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    oracle = variational_bound(Oracle(data, short_schedule), short_schedule, data.float(), variance="fixedsmall",
                               generator=torch.Generator().manual_seed(0))
    zero = variational_bound(Zero(), short_schedule, data.float(), variance="fixedsmall",
                             generator=torch.Generator().manual_seed(0))
    assert oracle.total.max() < zero.total.min()
    assert oracle.total.mean() < 0.5 * zero.total.mean()
    torch.testing.assert_close(oracle.total, oracle.prior + oracle.terms.sum(1))
    assert (oracle.terms[:, 1:] >= 0).all()  # KLs; the decoder term is a -log of a probability, also >= 0
    assert (oracle.terms[:, 0] >= 0).all()


def test_a_single_image_oracle_with_beta_tilde_leaves_only_prior_and_decoder(short_schedule):
    """With one image the oracle's x0 is exact, so each KL between two Gaussians of equal
    variance (beta_tilde) and equal mean is 0; the decoder is the mass of a Gaussian of
    variance beta_tilde_1 around the pixel, over its bin."""
    image = pixels(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    bound = variational_bound(Oracle(image, short_schedule), short_schedule, image.float(), variance="fixedsmall")
    assert bound.terms[:, 1:].abs().max() < 1e-9
    s64 = NoiseSchedule.from_betas(short_schedule.betas.double(), torch.float64)
    scale = s64.posterior_variance[1].sqrt()
    normal = torch.distributions.Normal(image, scale)
    upper = torch.where(image > 0.999, torch.ones_like(image), normal.cdf(image + 1 / 255))
    lower = torch.where(image < -0.999, torch.zeros_like(image), normal.cdf(image - 1 / 255))
    expected = -(upper - lower).log().mean() / math.log(2)
    torch.testing.assert_close(bound.terms[0, 0], expected, rtol=1e-6, atol=0)


def test_rate_distortion_accumulates_the_terms_from_the_prior(short_schedule):
    data = pixels(4, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    bound = variational_bound(Oracle(data[:2], short_schedule), short_schedule, data.float())
    curve = rate_distortion(bound)
    assert curve.rate.shape == curve.distortion.shape == (50,)
    torch.testing.assert_close(curve.rate[-1], bound.prior.mean())  # x_T: the prior's bits only
    torch.testing.assert_close(curve.rate[0] + bound.terms[:, 0].mean(), bound.total.mean())
    assert (curve.rate[:-1] >= curve.rate[1:]).all()  # more bits received, the later the step
    report = bound_report(bound)
    assert report["rate"] + report["distortion"] == pytest.approx(report["bits_per_dim"])
    assert report["final_rmse_0_255"] == pytest.approx(float(curve.distortion[0]))
    assert sum(report["terms_by_t"].values()) == pytest.approx(float(bound.terms.mean(0).sum()))


def test_the_bound_is_reproducible_with_a_generator_and_restores_train_mode(short_schedule):
    data = pixels(2, 1, 4, 4)
    model = Oracle(data, short_schedule).train()
    a = variational_bound(model, short_schedule, data.float(), generator=torch.Generator().manual_seed(9))
    b = variational_bound(model, short_schedule, data.float(), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.terms, b.terms, rtol=0, atol=0)
    assert model.training
