"""Continuing the reverse process from a latent x_t, samples that share it (Ho et al. 2020,
Fig. 7) and interpolation between two images' latents (Fig. 8)."""

import pytest
import torch

from conftest import TINY_UNET, randomize_
from ddpm_core.config import DiffusionConfig
from ddpm_core.denoisers import build_model
from ddpm_core.diffusion import q_sample
from ddpm_core.latents import interpolate, samples_from_latent, shared_latents
from ddpm_core.sampling import ddpm_step, sample
from ddpm_core.schedule import NoiseSchedule

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_(build_model(TINY_UNET)).eval()
    return model, NoiseSchedule.from_config(DiffusionConfig("linear", 40))


def test_t_start_continues_the_chain_exactly_where_it_was(setup):
    """Stopping a chain at x_t and continuing it from there with the generator in the state it
    had is the same chain."""
    model, schedule = setup
    full = sample(model, schedule, (2, *SHAPE), trajectory_steps=[17], generator=torch.Generator().manual_seed(3))
    # replay the first steps by hand to get the generator to where the chain stood at t = 17
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((2, *SHAPE), generator=generator)
    with torch.no_grad():
        for t in range(39, 17, -1):
            x = ddpm_step(schedule, model(x, torch.full((2,), t)), x, t, generator=generator).x_prev
    torch.testing.assert_close(x, full.trajectory.x_t[0])
    rest = sample(model, schedule, x.shape, x_T=x, t_start=17, generator=generator)
    torch.testing.assert_close(rest.samples, full.samples)


def test_t_start_is_refused_off_the_samplers_steps_or_without_a_latent(setup):
    model, schedule = setup
    x = torch.randn(1, *SHAPE)
    with pytest.raises(ValueError, match="not a step this sampler visits"):
        sample(model, schedule, x.shape, "ddim", num_steps=4, x_T=x, t_start=17)
    with pytest.raises(ValueError, match="not a step this sampler visits"):
        sample(model, schedule, x.shape, x_T=x, t_start=40)
    with pytest.raises(ValueError, match="pass x_T=x_t"):
        sample(model, schedule, x.shape, t_start=10)
    assert sample(model, schedule, x.shape, "ddim", num_steps=4, x_T=x, t_start=20).samples.shape == x.shape


def test_samples_from_one_latent_differ_more_the_earlier_the_latent(setup):
    model, schedule = setup
    result = shared_latents(model, schedule, SHAPE, [39, 20, 2], num_samples=6,
                            generator=torch.Generator().manual_seed(0))
    assert result.timesteps == [39, 20, 2]
    assert result.latents.shape == (3, *SHAPE) and result.samples.shape == (3, 6, *SHAPE)
    spread = result.samples.std(dim=1).mean(dim=(1, 2, 3))  # (3,): across the 6 draws
    assert spread[0] > spread[1] > spread[2] > 0


def test_samples_from_latent_start_from_it(setup):
    model, schedule = setup
    x_t = torch.randn(*SHAPE)
    a = samples_from_latent(model, schedule, x_t, 0, 3, generator=torch.Generator().manual_seed(1))
    # one step from t = 0 is the (clipped) mean: no noise, the same for every draw
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])


def test_interpolation_ends_are_the_two_images_own_reconstructions(setup):
    model, schedule = setup
    x0_a, x0_b = torch.rand(2, *SHAPE) * 2 - 1
    rows = interpolate(model, schedule, x0_a, x0_b, 25, [0.0, 0.5, 1.0], generator=torch.Generator().manual_seed(2))
    alone_a = interpolate(model, schedule, x0_a, x0_b, 25, [0.0], generator=torch.Generator().manual_seed(2))
    swapped = interpolate(model, schedule, x0_b, x0_a, 25, [0.0], generator=torch.Generator().manual_seed(2))
    assert rows.shape == (3, *SHAPE)
    torch.testing.assert_close(rows[0], alone_a[0])
    torch.testing.assert_close(rows[2], swapped[0])
    assert not torch.allclose(rows[1], rows[0]) and not torch.allclose(rows[1], rows[2])


def test_interpolated_latent_is_the_noised_pixel_blend(setup):
    """With one eps for both images, (1 - l) x_t + l x'_t = q_sample of the blend with that eps."""
    _, schedule = setup
    x0 = torch.rand(2, *SHAPE) * 2 - 1
    eps = torch.randn(*SHAPE).expand(2, *SHAPE)
    t = torch.full((2,), 30)
    x_t = q_sample(schedule, x0, t, noise=eps)
    blend = 0.3 * x0[0] + 0.7 * x0[1]
    torch.testing.assert_close(0.3 * x_t[0] + 0.7 * x_t[1], q_sample(schedule, blend[None], t[:1], noise=eps[:1])[0])
