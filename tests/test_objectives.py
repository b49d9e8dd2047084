"""Table 2's parameterisations and objectives (Ho et al. 2020) against their closed forms, and
a model trained on each of them sampled through the same eps-based samplers."""

import math

import pytest
import torch
from torch import nn

from conftest import TINY_UNET
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import DiffusionConfig, ModelConfig, TrainConfig, replace
from ddpm_core.diffusion import loss_simple, q_posterior, q_sample
from ddpm_core.objectives import EpsFromPrediction, eps_from_prediction, training_loss, x0_from_mean
from ddpm_core.sampling import ddim_sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.training import Trainer


class Constant(nn.Module):
    """A "network" that outputs a fixed tensor, whatever its input."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = nn.Parameter(output.clone())

    def forward(self, x_t, t, y=None):
        return self.output


def batch(schedule, n=6):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1
    eps = torch.randn(n, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 10, 300, 700, 999])[:n]
    return x0, eps, t, q_sample(schedule, x0, t, noise=eps)


@pytest.mark.parametrize("prediction", ["eps", "x0", "mu"])
def test_each_parameterisation_of_the_true_target_gives_the_true_eps(linear_schedule, prediction):
    x0, eps, t, x_t = batch(linear_schedule)
    target = {"eps": eps, "x0": x0, "mu": q_posterior(linear_schedule, x0, x_t, t).mean}[prediction]
    torch.testing.assert_close(eps_from_prediction(linear_schedule, x_t, t, target, prediction), eps,
                               rtol=0, atol=2e-3 if prediction == "mu" else 1e-4)


def test_x0_from_mean_inverts_eq_7_in_float64(linear_schedule):
    s64 = NoiseSchedule.from_betas(linear_schedule.betas.double(), torch.float64)
    x0, _, t, x_t = (v.double() for v in batch(linear_schedule))
    t = t.long()
    torch.testing.assert_close(x0_from_mean(s64, x_t, t, q_posterior(s64, x0, x_t, t).mean), x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "mu"])
def test_the_simple_objective_is_zero_at_the_target_and_the_mse_elsewhere(linear_schedule, prediction):
    x0, eps, t, x_t = batch(linear_schedule)
    target = {"eps": eps, "x0": x0, "mu": q_posterior(linear_schedule, x0, x_t, t).mean}[prediction]
    exact = training_loss(Constant(target), linear_schedule, x0, prediction, "simple", t=t, noise=eps)
    assert exact.item() == pytest.approx(0.0, abs=1e-12)
    off = training_loss(Constant(target + 0.5), linear_schedule, x0, prediction, "simple", t=t, noise=eps)
    assert off.item() == pytest.approx(0.25, rel=1e-5)


def test_eps_and_simple_is_loss_simple_bit_for_bit(linear_schedule):
    x0, eps, t, _ = batch(linear_schedule)
    torch.manual_seed(1)
    model = nn.Conv2d(1, 1, 3, padding=1)
    wrapped = lambda x, tt, y=None: model(x)  # noqa: E731
    weights = torch.rand(6)
    for w in (None, weights):
        assert torch.equal(training_loss(wrapped, linear_schedule, x0, "eps", "simple", t=t, noise=eps, weights=w),
                           loss_simple(wrapped, linear_schedule, x0, t=t, noise=eps, weights=w))


@pytest.mark.parametrize("prediction, objective", [("eps", "simple"), ("x0", "simple"), ("mu", "vlb")])
def test_per_sample_terms_average_to_the_loss(linear_schedule, prediction, objective):
    """What the loss history records (`per_sample`): each sample's weighted term, whose mean is the loss."""
    x0, eps, t, _ = batch(linear_schedule)
    model = Constant(eps + 0.3 * torch.randn_like(eps))
    for w in (None, torch.rand(6)):
        terms = training_loss(model, linear_schedule, x0, prediction, objective, t=t, noise=eps, weights=w,
                              per_sample=True)
        assert terms.shape == (6,)
        torch.testing.assert_close(terms.mean(), training_loss(model, linear_schedule, x0, prediction, objective,
                                                               t=t, noise=eps, weights=w))
        if w is not None:  # the weights scale each sample's own term
            unweighted = training_loss(model, linear_schedule, x0, prediction, objective, t=t, noise=eps,
                                       per_sample=True)
            torch.testing.assert_close(terms, w * unweighted)


def test_the_bound_objective_for_eps_is_eq_12s_weighted_mse(linear_schedule):
    """Ho et al. 2020, Eq. (12): L_{t-1} - C = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))
    ||eps - eps_theta||^2 (per dimension, in nats), here with sigma_t^2 = beta_tilde_t."""
    x0, eps, t, _ = batch(linear_schedule)
    t = torch.tensor([1, 5, 10, 300, 700, 999])
    eps_pred = eps + 0.1 * torch.randn_like(eps)
    got = torch.stack([training_loss(Constant(eps_pred[i:i + 1]), linear_schedule, x0[i:i + 1], "eps", "vlb",
                                     t=t[i:i + 1], noise=eps[i:i + 1], variance="fixedsmall") for i in range(6)])
    s = linear_schedule
    weight = s.betas[t] ** 2 / (2 * s.posterior_variance[t] * s.alphas[t] * (1 - s.alphas_cumprod[t]))
    expected = weight * (eps - eps_pred).square().flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "mu"])
def test_the_bound_objective_is_lowest_at_the_true_target(linear_schedule, prediction):
    x0, eps, t, x_t = batch(linear_schedule)
    x0 = ((x0 + 1) * 127.5).round() / 127.5 - 1  # pixel values, for the decoder at t = 0
    x_t = q_sample(linear_schedule, x0, t, noise=eps)
    target = {"eps": eps, "x0": x0, "mu": q_posterior(linear_schedule, x0, x_t, t).mean}[prediction]
    exact = training_loss(Constant(target), linear_schedule, x0, prediction, "vlb", t=t, noise=eps)
    off = training_loss(Constant(target + 0.05), linear_schedule, x0, prediction, "vlb", t=t, noise=eps)
    assert torch.isfinite(exact) and exact < off


def test_bad_choices_are_refused_with_the_valid_ones(linear_schedule):
    with pytest.raises(ValueError, match="eps, mu, x0"):
        ModelConfig(prediction="v")
    with pytest.raises(ValueError, match="simple, vlb"):
        TrainConfig(objective="hybrid")
    with pytest.raises(ValueError, match="timestep_sampling 'importance'; valid choices: uniform, loss"):
        TrainConfig(timestep_sampling="importance")
    with pytest.raises(ValueError, match="eps, mu, x0"):
        EpsFromPrediction(nn.Identity(), linear_schedule, "score")


def test_the_default_choices_keep_existing_run_keys():
    from ddpm_core.config import RunSpec

    spec = RunSpec("smoke", "mnist", TINY_UNET, DiffusionConfig("linear", 100), TrainConfig(steps=5))
    same = RunSpec("smoke", "mnist", replace(TINY_UNET, prediction="eps"), DiffusionConfig("linear", 100),
                   TrainConfig(steps=5, objective="simple"))
    other = RunSpec("smoke", "mnist", replace(TINY_UNET, prediction="x0"), DiffusionConfig("linear", 100),
                    TrainConfig(steps=5))
    assert spec.key == same.key != other.key
    uniform_t = RunSpec("smoke", "mnist", TINY_UNET, DiffusionConfig("linear", 100),
                        TrainConfig(steps=5, timestep_sampling="uniform"))
    loss_t = RunSpec("smoke", "mnist", TINY_UNET, DiffusionConfig("linear", 100),
                     TrainConfig(steps=5, timestep_sampling="loss"))
    assert spec.key == uniform_t.key != loss_t.key


@pytest.mark.parametrize("prediction, objective", [("x0", "simple"), ("mu", "vlb")])
def test_a_model_of_each_kind_trains_saves_and_samples(tmp_path, prediction, objective):
    model_config = replace(TINY_UNET, prediction=prediction)
    diffusion = DiffusionConfig("linear", 30)
    train = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=4, log_every=2,
                        objective=objective, sample_every=4, sample_images=2)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(16, dtype=torch.long))
    result = Trainer(model_config, diffusion, train, dataset, tmp_path, holdout=images[:4]).run()
    assert math.isfinite(result.final_loss)
    assert (tmp_path / "samples" / "step_0000004.png").is_file()
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.model_config.prediction == prediction
    model = checkpoint.build_model()
    assert isinstance(model, EpsFromPrediction)
    samples = ddim_sample(model, NoiseSchedule.from_config(diffusion), (2, 1, 8, 8), num_steps=5,
                          generator=torch.Generator().manual_seed(0)).samples
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()
    # what the samplers see is the network's output converted to eps
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 15])
    with torch.no_grad():
        raw = model.net(x_t, t)
        torch.testing.assert_close(model(x_t, t), eps_from_prediction(model.schedule, x_t, t, raw, prediction))


def test_the_loss_curve_names_the_objective_a_run_trains_on():
    from ddpm_core.monitor import plot_loss_curve
    from ddpm_core.objectives import objective_name

    records = [{"step": 10, "loss": 0.5}, {"step": 10, "heldout_loss": 0.4}]
    cases = [(TINY_UNET, TrainConfig(), "training loss (L_simple)"),
             (replace(TINY_UNET, prediction="x0"), TrainConfig(), "training loss (MSE of x0)"),
             (replace(TINY_UNET, prediction="mu"), TrainConfig(objective="vlb"), "training loss (the bound's terms")]
    for model_config, train_config, expected in cases:
        name = objective_name(model_config, train_config)
        legend = [t.get_text() for t in plot_loss_curve(records, "uniform", name).axes[0].get_legend().get_texts()]
        assert legend[0].startswith(expected), legend
        assert legend[1] == "held-out L_simple, EMA weights"
