"""DDPM and DDIM steps against diffusers' schedulers, and the sampling loops."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import TINY_UNET, randomize_
from ddpm_core.config import DiffusionConfig
from ddpm_core.schedule import NoiseSchedule, make_betas
from ddpm_core.sampling import (
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    sample,
)
from ddpm_core.unet import UNet

DIFFUSERS_VARIANCE = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


def schedule_for(name: str) -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig(name, 1000))


def in_float64(scheduler, name: str):
    """Run a diffusers scheduler in float64 on our betas.

    diffusers keeps alpha_bar in float32, where 1 - alpha_bar_t loses ~1e-3 of its value to
    cancellation at small t; in float64 the only difference left is our float32 storage.
    The betas themselves are checked against diffusers' own in test_schedule.py.
    """
    scheduler.betas = make_betas(name, 1000)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [999, 700, 487, 50, 1, 0])
def test_ddpm_step_matches_diffusers(schedule_name, variance, clip, t):
    schedule = schedule_for(schedule_name)
    theirs = in_float64(DDPMScheduler(
        num_train_timesteps=1000, variance_type=DIFFUSERS_VARIANCE[variance], clip_sample=clip,
        prediction_type="epsilon",
    ), schedule_name)
    x_t, eps = torch.randn(2, 3, 8, 8) * 1.5, torch.randn(2, 3, 8, 8)
    # diffusers draws its noise from the generator with exactly this call
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
    expected = theirs.step(eps.double(), t, x_t.double(), generator=torch.Generator().manual_seed(7))
    ours = ddpm_step(schedule, eps, x_t, t, variance, clip, noise=noise)
    # our float32 coefficients: relative error ~1e-7, times 1/sqrt(alpha_bar_t) (up to ~700)
    atol = 2e-6 * schedule.sqrt_recip_alphas_cumprod[t].item()
    torch.testing.assert_close(ours.x0_pred, expected.pred_original_sample.float(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(ours.x_prev, expected.prev_sample.float(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_steps_match_diffusers(schedule_name, eta, clip, num_steps):
    schedule = schedule_for(schedule_name)
    theirs = in_float64(DDIMScheduler(
        num_train_timesteps=1000, clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
        timestep_spacing="leading", prediction_type="epsilon",
    ), schedule_name)
    theirs.set_timesteps(num_steps)
    taus = ddim_timesteps(1000, num_steps, "uniform")
    assert list(reversed(taus)) == theirs.timesteps.tolist()
    pairs = list(zip(reversed(taus), [*reversed(taus[:-1]), -1]))
    x_t = torch.randn(2, 1, 6, 6)
    for t, t_prev in pairs:
        eps, noise = torch.randn_like(x_t), torch.randn_like(x_t)
        expected = theirs.step(
            eps.double(), t, x_t.double(), eta=eta, use_clipped_model_output=True, variance_noise=noise.double()
        )
        ours = ddim_step(schedule, eps, x_t, t, t_prev, eta, clip, noise=noise)
        atol = 2e-6 * schedule.sqrt_recip_alphas_cumprod[t].item()
        torch.testing.assert_close(ours.x0_pred, expected.pred_original_sample.float(), rtol=1e-5, atol=atol)
        torch.testing.assert_close(ours.x_prev, expected.prev_sample.float(), rtol=1e-5, atol=atol)
        x_t = expected.prev_sample.float()


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_ddim_with_eta_1_over_every_step_is_ddpm_with_beta_tilde(linear_schedule, t):
    # Song et al. 2021, Sec. 4.1: sigma(eta = 1) = sqrt(beta_tilde_t), and the means agree.
    x_t, eps, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    ddim = ddim_step(linear_schedule, eps, x_t, t, t - 1, eta=1.0, noise=noise)
    ddpm = ddpm_step(linear_schedule, eps, x_t, t, "fixedsmall", noise=noise)
    torch.testing.assert_close(ddim.x_prev, ddpm.x_prev, rtol=1e-4, atol=1e-5)


def test_ddpm_step_without_clipping_is_algorithm_2_line_4(linear_schedule):
    # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z
    s, t = linear_schedule, 300
    x_t, eps, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    expected = (x_t - s.betas[t] / s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.alphas[t].sqrt() + s.betas[t].sqrt() * z
    ours = ddpm_step(s, eps, x_t, t, "fixedlarge", clip_denoised=False, noise=z)
    torch.testing.assert_close(ours.x_prev, expected, rtol=1e-4, atol=1e-5)


def test_last_ddpm_step_adds_no_noise(linear_schedule):
    x_t, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    a = ddpm_step(linear_schedule, eps, x_t, 0, noise=torch.randn(2, 1, 4, 4))
    b = ddpm_step(linear_schedule, eps, x_t, 0, noise=torch.randn(2, 1, 4, 4))
    torch.testing.assert_close(a.x_prev, b.x_prev)
    torch.testing.assert_close(a.x_prev, a.x0_pred)  # coef1 = 1, coef2 = 0 at t = 0


def test_ddim_timestep_spacings():
    assert ddim_timesteps(1000, 10) == list(range(0, 1000, 100))
    assert ddim_timesteps(10, 10) == list(range(10))
    assert ddim_timesteps(1000, 3) == [0, 333, 666]
    quad = ddim_timesteps(1000, 20, "quadratic")
    assert quad[0] == 0 and quad[-1] == 800 and len(quad) == 20
    assert all(b - a >= 1 for a, b in zip(quad, quad[1:]))
    assert all((b - a) <= (c - b) + 1 for a, b, c in zip(quad, quad[1:], quad[2:]))  # growing gaps
    for S in (50, 100, 500, 1000):  # rounding would repeat small steps: always S distinct ones
        taus = ddim_timesteps(1000, S, "quadratic")
        assert len(set(taus)) == S and taus == sorted(taus) and taus[-1] <= 999


@pytest.mark.parametrize("S", [0, 1001])
def test_more_steps_than_T_is_refused(S):
    with pytest.raises(ValueError, match="between 1 and T = 1000"):
        ddim_timesteps(1000, S)


def test_bad_sampler_options_name_the_choices(linear_schedule):
    model = UNet(TINY_UNET)
    with pytest.raises(ValueError, match="fixedlarge, fixedsmall"):
        ddpm_step(linear_schedule, torch.zeros(1), torch.zeros(1), 3, variance="learned")
    with pytest.raises(ValueError, match="uniform, quadratic"):
        ddim_timesteps(1000, 10, "linear")
    with pytest.raises(ValueError, match="ddpm, ddim"):
        sample(model, linear_schedule, (1, 1, 8, 8), sampler="euler")
    with pytest.raises(ValueError, match="use sampler='ddim'"):
        sample(model, linear_schedule, (1, 1, 8, 8), sampler="ddpm", num_steps=50)
    with pytest.raises(ValueError, match="between 1 and T"):
        sample(model, linear_schedule, (1, 1, 8, 8), sampler="ddim", num_steps=2000)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return randomize_(UNet(TINY_UNET), std=0.02)


@pytest.fixture(scope="module")
def short_schedule():
    return NoiseSchedule.from_config(DiffusionConfig("cosine", 20))


def test_ddpm_sample_is_the_six_line_loop(tiny_model, short_schedule):
    out = ddpm_sample(tiny_model, short_schedule, (3, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    with torch.no_grad():
        for t in reversed(range(short_schedule.num_timesteps)):
            eps_pred = tiny_model(x, torch.full((3,), t))
            x = ddpm_step(short_schedule, eps_pred, x, t, generator=generator).x_prev
    torch.testing.assert_close(out.samples, x)
    assert out.trajectory is None


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_samples_are_finite_and_clipped_x0_stays_in_range(tiny_model, short_schedule, variance):
    out = ddpm_sample(tiny_model, short_schedule, (4, 1, 8, 8), variance=variance, trajectory_steps=range(20))
    assert out.samples.shape == (4, 1, 8, 8) and torch.isfinite(out.samples).all()
    assert out.trajectory.timesteps == list(reversed(range(20)))
    assert out.trajectory.x_t.shape == (20, 4, 1, 8, 8)
    assert out.trajectory.x0_pred.abs().max() <= 1.0


def test_ddim_eta_0_is_deterministic_given_x_T(tiny_model, short_schedule):
    x_T = torch.randn(2, 1, 8, 8)
    a = ddim_sample(tiny_model, short_schedule, x_T.shape, num_steps=5, x_T=x_T).samples
    b = ddim_sample(tiny_model, short_schedule, x_T.shape, num_steps=5, x_T=x_T,
                    generator=torch.Generator().manual_seed(99)).samples
    torch.testing.assert_close(a, b)
    c = ddim_sample(tiny_model, short_schedule, x_T.shape, num_steps=5, x_T=x_T, eta=1.0,
                    generator=torch.Generator().manual_seed(99)).samples
    assert not torch.allclose(a, c)


def test_ddim_trajectory_records_only_visited_steps(tiny_model, short_schedule):
    out = ddim_sample(tiny_model, short_schedule, (2, 1, 8, 8), num_steps=4, trajectory_steps=[15, 10, 3])
    assert ddim_timesteps(20, 4) == [0, 5, 10, 15]
    assert out.trajectory.timesteps == [15, 10]


def test_samplers_restore_training_mode_and_need_no_grad(tiny_model, short_schedule):
    tiny_model.train()
    out = sample(tiny_model, short_schedule, (1, 1, 8, 8), sampler="ddim", num_steps=3)
    assert tiny_model.training
    assert not out.samples.requires_grad
    tiny_model.eval()


def test_generator_makes_sampling_reproducible(tiny_model, short_schedule):
    a = sample(tiny_model, short_schedule, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1)).samples
    b = sample(tiny_model, short_schedule, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1)).samples
    torch.testing.assert_close(a, b)


def test_class_labels_reach_the_model(short_schedule):
    seen = []

    def model(x_t, t, y=None):
        seen.append(y)
        return torch.zeros_like(x_t)

    sample(model, short_schedule, (2, 1, 4, 4), sampler="ddim", num_steps=2, y=torch.tensor([4, 5]))
    assert [y.tolist() for y in seen] == [[4, 5], [4, 5]]


def test_amp_path_runs_and_returns_float32(tiny_model, short_schedule):
    out = sample(tiny_model, short_schedule, (2, 1, 8, 8), sampler="ddim", num_steps=3, amp=True)
    assert out.samples.dtype == torch.float32 and torch.isfinite(out.samples).all()
