"""The forward process, the posterior and L_simple against their closed forms."""

import pytest
import torch

from ddpm_core.diffusion import (
    LossAwareTimesteps,
    loss_simple,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    sample_timesteps,
    timestep_weights,
)


def test_q_sample_is_eq_4_with_given_noise(linear_schedule):
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(linear_schedule, x0, t, noise=noise)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()
    expected = abar.sqrt()[:, None, None, None] * x0 + (1 - abar).sqrt()[:, None, None, None] * noise
    torch.testing.assert_close(x_t, expected)


@pytest.mark.parametrize("t", [0, 100, 600, 999])
def test_q_sample_has_the_right_mean_and_variance(linear_schedule, t):
    n = 200_000
    x0 = torch.tensor([-0.8, 0.0, 0.5, 1.0]).view(1, 4, 1, 1).expand(n, 4, 1, 1)
    generator = torch.Generator().manual_seed(1)
    x_t = q_sample(linear_schedule, x0, torch.full((n,), t), generator=generator)
    abar = linear_schedule.alphas_cumprod[t]
    torch.testing.assert_close(x_t.mean(0), abar.sqrt() * x0[0], rtol=0, atol=0.01)
    torch.testing.assert_close(x_t.var(0), (1 - abar).expand(4, 1, 1), rtol=0.02, atol=0)


def test_q_sample_is_reproducible_with_a_generator(linear_schedule):
    x0, t = torch.zeros(2, 1, 4, 4), torch.tensor([3, 700])
    a = q_sample(linear_schedule, x0, t, generator=torch.Generator().manual_seed(5))
    b = q_sample(linear_schedule, x0, t, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_posterior_matches_bayes_rule(linear_schedule):
    """q(x_{t-1} | x_t, x_0) from the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0),
    computed here independently in float64 (completing the square)."""
    s = linear_schedule
    t = torch.tensor([1, 2, 50, 500, 998, 999])
    x0, x_t = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    beta, alpha, abar_prev = betas[t], 1 - betas[t], abar[t - 1]
    precision = alpha / beta + 1 / (1 - abar_prev)
    variance = 1 / precision
    view = (-1, 1, 1, 1)
    mean = variance.view(view) * (
        (alpha.sqrt() / beta).view(view) * x_t.double() + (abar_prev.sqrt() / (1 - abar_prev)).view(view) * x0.double()
    )
    posterior = q_posterior(s, x0, x_t, t)
    torch.testing.assert_close(posterior.mean, mean.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(posterior.variance.flatten(), variance.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(posterior.log_variance_clipped.flatten(), variance.log().float(), rtol=1e-4, atol=0)


def test_posterior_at_t0_returns_x0(linear_schedule):
    x0, x_t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    posterior = q_posterior(linear_schedule, x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(posterior.mean, x0)
    assert (posterior.variance == 0).all()


@pytest.mark.parametrize("t", [0, 1, 300, 999])
def test_x0_is_recovered_from_the_true_noise(linear_schedule, cosine_schedule, t):
    for schedule in (linear_schedule, cosine_schedule):
        x0 = torch.rand(2, 3, 5, 5) * 2 - 1
        eps = torch.randn_like(x0)
        tt = torch.full((2,), t)
        x_t = q_sample(schedule, x0, tt, noise=eps)
        # 1/sqrt(alpha_bar) reaches ~157 (linear) and ~700 (cosine) at t = 999: float32 rounding grows with it
        atol = 1e-5 * schedule.sqrt_recip_alphas_cumprod[t].item() * 4
        torch.testing.assert_close(predict_x0_from_eps(schedule, x_t, tt, eps), x0, rtol=0, atol=atol)
        torch.testing.assert_close(predict_eps_from_x0(schedule, x_t, tt, x0), eps, rtol=1e-4, atol=1e-4)


def test_timesteps_cover_all_T_indices():
    t = sample_timesteps(200_000, 10, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert t.min() == 0 and t.max() == 9  # never randint(1, T), which skips index 0
    assert counts.min() > 19_000 and counts.max() < 21_000


def test_loss_simple_is_the_eps_mse(linear_schedule):
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 5, 50, 999]), torch.randn(4, 1, 4, 4)

    def oracle(x_t, t, y=None):  # knows eps exactly: loss 0
        return (x_t - linear_schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0) / linear_schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)

    assert loss_simple(oracle, linear_schedule, x0, t=t, noise=noise).item() == pytest.approx(0, abs=1e-8)

    def zero(x_t, t, y=None):  # predicts nothing: loss = E[eps^2]
        return torch.zeros_like(x_t)

    assert loss_simple(zero, linear_schedule, x0, t=t, noise=noise).item() == pytest.approx(noise.pow(2).mean().item())


def test_loss_simple_passes_labels_and_backpropagates(linear_schedule):
    seen = {}
    weight = torch.zeros(1, requires_grad=True)

    def model(x_t, t, y=None):
        seen["y"] = y
        return x_t * weight

    loss = loss_simple(model, linear_schedule, torch.zeros(3, 1, 2, 2), y=torch.tensor([1, 2, 3]))
    loss.backward()
    assert seen["y"].tolist() == [1, 2, 3]
    assert weight.grad is not None and weight.grad.abs().item() > 0


def test_timestep_weights_are_their_closed_forms_and_match_diffusers_snr(linear_schedule):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 1, 10, 100, 250, 500, 999])
    alpha_bar = linear_schedule.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    reference = compute_snr(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"), t).double()
    torch.testing.assert_close(linear_schedule.snr()[t].double(), reference, rtol=1e-3, atol=0)  # float32 1 - alpha_bar
    torch.testing.assert_close(timestep_weights(linear_schedule, t).double(), torch.ones(7, dtype=torch.float64))
    min_snr = timestep_weights(linear_schedule, t, "min_snr", min_snr_gamma=5.0).double()
    torch.testing.assert_close(min_snr, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr,
                               rtol=1e-5, atol=0)
    assert min_snr[-1] == 1.0 and min_snr[0] < 5.0 / 1e3  # noisy steps kept, near-clean ones turned down
    p2 = timestep_weights(linear_schedule, t, "p2", p2_gamma=0.5).double()
    torch.testing.assert_close(p2, (1 + snr) ** -0.5, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="valid choices: uniform, min_snr, p2"):
        timestep_weights(linear_schedule, t, "snr")


def test_a_weighted_loss_is_the_weighted_mean_of_each_samples_mse(linear_schedule):
    x0, noise = torch.zeros(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t, weights = torch.tensor([3, 30, 300]), torch.tensor([0.5, 2.0, 0.0])

    def zero(x_t, t, y=None):  # the loss of each sample is then the mean of its eps^2
        return torch.zeros_like(x_t)

    per_sample = noise.pow(2).mean(dim=(1, 2, 3))
    loss = loss_simple(zero, linear_schedule, x0, t=t, noise=noise, weights=weights)
    assert loss.item() == pytest.approx((weights * per_sample).mean().item())
    uniform = loss_simple(zero, linear_schedule, x0, t=t, noise=noise, weights=torch.ones(3))
    assert uniform.item() == pytest.approx(loss_simple(zero, linear_schedule, x0, t=t, noise=noise).item())


def filled(sampler: LossAwareTimesteps, losses: torch.Tensor) -> LossAwareTimesteps:
    """`sampler` after recording `losses` (T, history) column by column: every t full."""
    for column in losses.T:
        sampler.update(torch.arange(sampler.num_timesteps), column)
    return sampler


def test_loss_aware_timesteps_are_uniform_until_every_step_holds_its_history():
    sampler = LossAwareTimesteps(5, history=2)
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(sampler.sample(16, generator=gen_a), sample_timesteps(16, 5, generator=gen_b))
    assert torch.equal(sampler.weights(torch.tensor([0, 4])), torch.ones(2))
    sampler.update(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3]), torch.full((9,), 7.0))  # t = 4 holds one loss
    assert not sampler.warm and torch.equal(sampler.probabilities(), torch.full((5,), 0.2, dtype=torch.float64))
    sampler.update(torch.tensor([4]), torch.tensor([7.0]))
    assert sampler.warm


def test_loss_aware_probabilities_are_the_mixed_root_mean_square_and_keep_the_objective():
    """p_t = (1 - u) sqrt(E[L_t^2]) / sum + u / T, and E_{t ~ p}[w_t L_t] with w_t = 1 / (T p_t) is
    the uniform-t mean (1/T) sum_t L_t (up to the float32 of the weights)."""
    T, u = 6, 0.1
    losses = torch.rand(T, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    sampler = filled(LossAwareTimesteps(T, history=3, uniform_share=u), losses)
    rms = losses.pow(2).mean(1).sqrt()
    p = sampler.probabilities()
    torch.testing.assert_close(p, (1 - u) * rms / rms.sum() + u / T)
    assert p.sum().item() == pytest.approx(1.0) and p.min() >= u / T
    steps = torch.arange(T)
    mean_loss = losses.mean(1)  # any per-t loss: the reweighting does not depend on it
    importance_weighted = (p * sampler.weights(steps).double() * mean_loss).sum()
    assert importance_weighted.item() == pytest.approx(mean_loss.mean().item(), rel=1e-6)


def test_loss_aware_draws_follow_the_probabilities_and_the_history_keeps_the_newest():
    T = 4
    sampler = filled(LossAwareTimesteps(T, history=2), torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]))
    t = sampler.sample(40_000, generator=torch.Generator().manual_seed(2))
    frequencies = torch.bincount(t, minlength=T).double() / t.numel()
    torch.testing.assert_close(frequencies, sampler.probabilities(), atol=0.01, rtol=0)  # 1/12, ..., 3/4
    assert sampler.probabilities()[3].item() == pytest.approx(0.999 * 9 / 12 + 0.001 / 4)
    sampler.update(torch.tensor([3, 3]), torch.tensor([1.0, 1.0]))  # the two 9s drop out: level again
    torch.testing.assert_close(sampler.probabilities(), torch.full((T,), 0.25, dtype=torch.float64))


def test_a_loss_history_round_trips_and_refuses_another_shape():
    sampler = filled(LossAwareTimesteps(3, history=2), torch.rand(3, 2, dtype=torch.float64))
    sampler.update(torch.tensor([1]), torch.tensor([5.0]))
    copy = LossAwareTimesteps(3, history=2)
    copy.load_state_dict(sampler.state_dict())
    assert torch.equal(copy.probabilities(), sampler.probabilities()) and torch.equal(copy.seen, sampler.seen)
    with pytest.raises(RuntimeError, match=r"shape \(3, 2\), not \(4, 2\)"):
        LossAwareTimesteps(4, history=2).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="history >= 1"):
        LossAwareTimesteps(3, history=0)
