"""Noise schedules against their closed forms, the paper's facts, and diffusers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_core.config import DiffusionConfig
from ddpm_core.schedule import NoiseSchedule, cosine_betas, linear_betas, make_betas


def test_linear_betas_are_the_papers_at_T_1000():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    steps = betas.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=0, atol=1e-15)


def test_linear_betas_scale_with_T_to_keep_total_noise():
    for T in (50, 100, 4000):
        betas = linear_betas(T)
        assert betas[0].item() == pytest.approx(1e-4 * 1000 / T)
        assert betas[-1].item() == pytest.approx(0.02 * 1000 / T)
        # sum(beta) is (about) T-invariant, so alpha_bar_T stays near zero for short chains
        assert betas.sum().item() == pytest.approx(linear_betas(1000).sum().item(), rel=1e-9)


def test_linear_schedule_refuses_T_where_beta_would_reach_one():
    with pytest.raises(ValueError, match="T >= 21"):
        linear_betas(20)
    assert linear_betas(21)[-1] < 1


def test_cosine_alpha_bar_follows_the_formula():
    T, s = 1000, 0.008
    schedule = NoiseSchedule.from_betas(cosine_betas(T))

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # Where no beta is clipped, alpha_bar at 0-indexed t is f(t + 1) / f(0).
    for t in (0, 1, 10, 250, 500, 900, 990):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    betas = cosine_betas(T)
    assert betas.max().item() == pytest.approx(0.999)  # the clip bites at the very end
    assert (betas <= 0.999).all()
    # s makes sqrt(beta_0) slightly smaller than the pixel bin size 1/127.5 (Nichol & Dhariwal)
    assert math.sqrt(betas[0].item()) < 1 / 127.5


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_are_monotone_and_in_range(name):
    schedule = NoiseSchedule.from_config(DiffusionConfig(name, 1000))
    assert (schedule.betas > 0).all() and (schedule.betas < 1).all()
    assert (schedule.betas.diff() >= 0).all()
    assert (schedule.alphas_cumprod.diff() < 0).all()
    assert schedule.alphas_cumprod[0] < 1 and schedule.alphas_cumprod[-1] < 1e-3
    for field in ("betas", "alphas_cumprod", "posterior_variance"):
        assert getattr(schedule, field).dtype == torch.float32


@pytest.mark.parametrize(("name", "diffusers_name"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(name, diffusers_name):
    ours = NoiseSchedule.from_config(DiffusionConfig(name, 1000))
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-7)


def test_coefficients_follow_the_algebra(linear_schedule):
    s = NoiseSchedule.from_betas(linear_betas(1000))
    b = linear_betas(1000)
    abar = torch.cumprod(1 - b, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    expected = {
        "alphas": 1 - b,
        "alphas_cumprod_prev": abar_prev,
        "log_alphas_cumprod": abar.log(),
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "sqrt_recip_alphas_cumprod": 1 / abar.sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(),
        "posterior_variance": b * (1 - abar_prev) / (1 - abar),
    }
    for name, value in expected.items():
        torch.testing.assert_close(getattr(s, name), value.float(), rtol=1e-6, atol=1e-9, msg=name)
    # beta_tilde_0 = 0, so the log variance is clipped to beta_tilde_1 there
    assert s.posterior_variance[0] == 0
    assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(s.posterior_variance[1].item()), rel=1e-6)
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())


def test_diffusers_golden_variances(linear_schedule):
    # diffusers' own test of DDPMScheduler: fixed_small variance at t = 0, 487, 999.
    assert linear_schedule.posterior_variance[0].item() == 0
    assert linear_schedule.posterior_variance[487].item() == pytest.approx(0.00979, abs=1e-5)
    assert linear_schedule.posterior_variance[999].item() == pytest.approx(0.02, abs=1e-5)


def test_prior_term_L_T_is_about_1e_5_bits_per_dim(linear_schedule):
    # Ho et al. 2020, Sec. 4: KL(q(x_T | x_0) || N(0, I)) ~ 1e-5 bits/dim for the linear schedule.
    abar_T = linear_schedule.alphas_cumprod[-1].double()
    x0 = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 8-bit pixel values, scaled
    mean_sq, var = abar_T * x0**2, 1 - abar_T
    kl_nats = 0.5 * (var + mean_sq - 1 - var.log())
    bits_per_dim = kl_nats.mean().item() / math.log(2)
    assert 3e-6 < bits_per_dim < 3e-5


@pytest.mark.parametrize("bad", ["quadratic", "Linear", ""])
def test_unknown_schedule_names_the_choices(bad):
    with pytest.raises(ValueError, match="linear, cosine"):
        make_betas(bad, 1000)
    with pytest.raises(ValueError, match="linear, cosine"):
        DiffusionConfig(schedule=bad)


@pytest.mark.parametrize("T", [1, 0, -5])
def test_T_below_two_is_refused(T):
    with pytest.raises(ValueError, match="at least 2"):
        DiffusionConfig(num_timesteps=T)
    with pytest.raises(ValueError, match="at least 2"):
        make_betas("cosine", T)


def test_schedule_moves_between_devices(linear_schedule):
    assert linear_schedule.to("cpu") is linear_schedule
    assert linear_schedule.to(torch.device("meta")).betas.device.type == "meta"
