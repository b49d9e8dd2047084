"""Guidance: the noise-aware classifier, its gradient, the guided DDPM and DDIM steps against
their closed forms, classifier-free guidance, label dropout, and the cached classifier."""

import pytest
import torch
from torch import nn

from ddpm_core.classifier import (
    ClassifierConfig, NoisyClassifier, accuracy_by_timestep, load_noisy_classifier,
    save_noisy_classifier, train_noisy_classifier,
)
from ddpm_core.classifier_runs import classifier_path, train_classifier, trained_classifier
from ddpm_core.config import ClassifierConfig, DiffusionConfig, SamplerConfig, replace
from ddpm_core.generation import generate
from ddpm_core.guidance import ClassifierFreeGuidance, classifier_grad, classifier_guidance
from ddpm_core.runs import class_conditional, resolve_run
from ddpm_core.sampling import ddim_step, ddpm_step, sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.training import TrainConfig, Trainer
from ddpm_core.unet import UNet
from conftest import TINY_UNET, randomize_
from fake_data import write_fake_cifar10, write_fake_mnist

SCHEDULE = NoiseSchedule.from_config(DiffusionConfig("linear", 100))
TINY = TINY_UNET


class LinearClassifier(nn.Module):
    """logits = W flatten(x) + b(t): log softmax has the closed-form gradient W_y - sum_k p_k W_k."""

    def __init__(self, num_pixels: int, num_classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(num_pixels, num_classes)
        self.bias_t = nn.Embedding(100, num_classes)

    def forward(self, x, t):
        return self.linear(x.flatten(1)) + self.bias_t(t)


def test_classifier_gradient_matches_the_softmax_closed_form():
    torch.manual_seed(0)
    classifier = LinearClassifier(16)
    x, t, y = torch.randn(5, 1, 4, 4), torch.randint(0, 100, (5,)), torch.tensor([0, 2, 1, 1, 0])
    grad = classifier_grad(classifier, x, t, y)
    W = classifier.linear.weight  # (K, D)
    probs = classifier(x, t).softmax(1)  # (B, K)
    expected = (W[y] - probs @ W).reshape(x.shape)
    assert grad.shape == x.shape
    torch.testing.assert_close(grad, expected.detach())


def test_per_sample_gradients_are_independent_across_the_batch():
    torch.manual_seed(1)
    classifier = NoisyClassifier(TINY, num_classes=4).eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 50, 99, 0]), torch.tensor([0, 1, 2, 3])
    batch = classifier_grad(classifier, x, t, y)
    for i in range(4):
        alone = classifier_grad(classifier, x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-6, rtol=1e-5)
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("t", [0, 1, 57, 99])
def test_guided_ddpm_step_shifts_the_mean_by_sigma_squared_times_the_gradient(variance, t):
    torch.manual_seed(2)
    x_t, eps, z, g = (torch.randn(3, 1, 4, 4) for _ in range(4))
    plain = ddpm_step(SCHEDULE, eps, x_t, t, variance, noise=z)
    zero = ddpm_step(SCHEDULE, eps, x_t, t, variance, noise=z, guidance_grad=torch.zeros_like(g))
    guided = ddpm_step(SCHEDULE, eps, x_t, t, variance, noise=z, guidance_grad=g)
    torch.testing.assert_close(zero.x_prev, plain.x_prev)
    sigma_sq = SCHEDULE.betas[t] if variance == "fixedlarge" else SCHEDULE.posterior_variance[t]
    torch.testing.assert_close(guided.x_prev, plain.x_prev + sigma_sq * g)  # Dhariwal & Nichol, Alg. 1


@pytest.mark.parametrize("t, t_prev, eta", [(99, 79, 0.0), (40, 20, 1.0), (5, -1, 0.0)])
def test_guided_ddim_step_uses_the_shifted_noise(t, t_prev, eta):
    torch.manual_seed(3)
    x_t, eps, z, g = (torch.randn(3, 1, 4, 4) for _ in range(4))
    plain = ddim_step(SCHEDULE, eps, x_t, t, t_prev, eta, noise=z)
    zero = ddim_step(SCHEDULE, eps, x_t, t, t_prev, eta, noise=z, guidance_grad=torch.zeros_like(g))
    torch.testing.assert_close(zero.x_prev, plain.x_prev)
    guided = ddim_step(SCHEDULE, eps, x_t, t, t_prev, eta, noise=z, guidance_grad=g)
    eps_hat = eps - (1 - SCHEDULE.alphas_cumprod[t]).sqrt() * g  # Dhariwal & Nichol, Alg. 2
    expected = ddim_step(SCHEDULE, eps_hat, x_t, t, t_prev, eta, noise=z)
    torch.testing.assert_close(guided.x_prev, expected.x_prev)
    assert not torch.allclose(guided.x_prev, plain.x_prev)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_scale_zero_samples_exactly_as_unguided(sampler):
    torch.manual_seed(4)
    model = UNet(TINY).eval()
    classifier = NoisyClassifier(TINY, num_classes=10)
    config = SamplerConfig(sampler, 10 if sampler == "ddim" else None, eta=1.0)

    def images(**guidance):
        return torch.cat(list(generate(model, 2, config, schedule=SCHEDULE, seed=5, **guidance)))

    plain = images()
    torch.testing.assert_close(images(labels=[3, 7], classifier=classifier, guidance_scale=0.0), plain)
    assert not torch.equal(images(labels=[3, 7], classifier=classifier, guidance_scale=50.0), plain)


def test_guidance_raises_the_requested_class_probability():
    """One guided step moves x towards the class asked for (the gradient points uphill)."""
    torch.manual_seed(6)
    classifier = LinearClassifier(16)
    x_t, t, y = torch.randn(64, 1, 4, 4), torch.full((64,), 10), torch.randint(0, 3, (64,))
    before = classifier(x_t, t).log_softmax(1)[torch.arange(64), y]
    moved = x_t + 0.01 * classifier_guidance(classifier, y, scale=5.0)(x_t, t)
    after = classifier(moved, t).log_softmax(1)[torch.arange(64), y]
    assert (after > before).all()
    with pytest.raises(ValueError, match=">= 0"):
        classifier_guidance(classifier, y, scale=-1.0)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_classifier_shapes_for_one_and_three_channels(channels, size):
    config = replace(TINY, in_channels=channels, image_size=size, attention_resolutions=(size // 2,))
    classifier = NoisyClassifier(config, num_classes=10)
    logits = classifier(torch.randn(2, channels, size, size), torch.tensor([0, 99]))
    assert logits.shape == (2, 10)
    grad = classifier_grad(classifier, torch.randn(2, channels, size, size), torch.tensor([5, 6]), torch.tensor([1, 9]))
    assert grad.shape == (2, channels, size, size)


def test_classifier_learns_the_class_and_loses_it_in_the_noise():
    """Two classes (bright and dark images): near-perfect at small t, chance at t = T - 1."""
    torch.manual_seed(7)
    y = torch.randint(0, 2, (256,))
    x0 = (torch.where(y == 1, 0.6, -0.6)[:, None, None, None] + 0.2 * torch.randn(256, 1, 8, 8)).clamp(-1, 1)
    dataset = torch.utils.data.TensorDataset(x0, y)
    classifier = NoisyClassifier(replace(TINY, attention=False), num_classes=2)
    losses = train_noisy_classifier(classifier, SCHEDULE, dataset, ClassifierConfig(steps=60, batch_size=32, lr=3e-3))
    assert len(losses) == 60
    accuracy = accuracy_by_timestep(classifier, SCHEDULE, x0, y, [0, 10, 99], torch.Generator().manual_seed(0))
    assert accuracy[0] > 0.95 and accuracy[1] > 0.9
    assert accuracy[2] < 0.75  # alpha_bar_99 ~ 0.006 here: almost no signal left


def test_classifier_bar_in_a_headless_batch_is_redrawn_by_time_not_by_step(monkeypatch, capsys):
    """With $DDPM_PROGRESS=text (what `make run` sets for its kernels) the bar writes to the
    batch's log every TEXT_BAR_INTERVAL_S: the loss shown beside it must not redraw it per step."""
    monkeypatch.setenv("DDPM_PROGRESS", "text")
    x0, y = torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 2, (64,))
    classifier = NoisyClassifier(replace(TINY, attention=False), num_classes=2)
    train_noisy_classifier(classifier, SCHEDULE, torch.utils.data.TensorDataset(x0, y),
                           ClassifierConfig(steps=40, batch_size=8), progress=True)
    drawn = capsys.readouterr().err.count("noise-aware classifier")
    assert 1 <= drawn <= 3, drawn  # the start and the end (one per step before: 42)


def test_classifier_round_trip_and_foreign_files(tmp_path):
    classifier = NoisyClassifier(TINY, num_classes=10)
    path = save_noisy_classifier(classifier, SCHEDULE_CONFIG, tmp_path / "c.pt", {"steps": 3})
    loaded, diffusion = load_noisy_classifier(path)
    assert diffusion == SCHEDULE_CONFIG and not loaded.training
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, t), classifier.eval()(x, t))
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ddpm_core.noisy_classifier file"):
        load_noisy_classifier(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_noisy_classifier(tmp_path / "missing.pt")


SCHEDULE_CONFIG = DiffusionConfig("linear", 100)


def test_classifier_free_guidance_combines_conditional_and_unconditional():
    torch.manual_seed(8)
    model = randomize_(UNet(replace(TINY, num_classes=10)).eval())  # else the zero-initialised output hides y
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 90]), torch.tensor([1, 4, 9])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, None)
        torch.testing.assert_close(ClassifierFreeGuidance(model, 0.0)(x, t, y), cond, atol=1e-5, rtol=1e-5)
        expected = 3.0 * cond - 2.0 * uncond  # (1 + w) eps_cond - w eps_uncond, w = 2
        torch.testing.assert_close(ClassifierFreeGuidance(model, 2.0)(x, t, y), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond)
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(UNet(TINY), 1.0)
    with pytest.raises(ValueError, match="labels y"):
        ClassifierFreeGuidance(model, 1.0)(x, t)


class RecordingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x_t, t, y=None):
        self.seen.append(y.clone())
        return x_t * self.weight


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_label_dropout_replaces_that_share_of_labels_with_the_null_label(dropout, tmp_path):
    config = replace(TINY, num_classes=10)
    x0, y = torch.zeros(2000, 1, 8, 8), torch.randint(0, 10, (2000,))
    dataset = torch.utils.data.TensorDataset(x0, y)
    trainer = Trainer(config, SCHEDULE_CONFIG, TrainConfig(steps=1, batch_size=2000, label_dropout=dropout),
                      dataset, tmp_path)
    recorder = RecordingModel()
    trainer.forward = recorder
    trainer.train_step(x0, y)
    seen = recorder.seen[0]
    dropped = seen == 10
    assert abs(dropped.float().mean().item() - dropout) < 0.04
    assert torch.equal(seen[~dropped], y[~dropped])  # the others keep their label
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(label_dropout=1.0)


def test_the_class_conditional_spec_is_the_same_budget_with_labels():
    spec = resolve_run("laptop")
    conditional = class_conditional(spec)
    assert conditional.model == replace(spec.model, num_classes=10)
    assert conditional.train == replace(spec.train, label_dropout=0.1)
    assert conditional.key != spec.key
    assert resolve_run("laptop", num_classes=10, label_dropout=0.1).key == conditional.key
    with pytest.raises(ValueError, match="labelled data"):
        class_conditional(resolve_run("laptop", dataset="folder"))


def test_a_classifier_depends_on_its_settings_not_on_what_ran_before(tmp_path):
    """Its initial weights come from ClassifierConfig.seed: the command line and a notebook,
    which draw different amounts from the global RNG first, train the same classifier."""
    write_fake_mnist(tmp_path / "data", n=24)
    spec, config = resolve_run("smoke"), ClassifierConfig(steps=2, batch_size=8)

    def weights(name: str) -> list[torch.Tensor]:
        train_classifier(spec.model, spec.diffusion, "mnist", config, tmp_path / name, tmp_path / "data", eval_images=0)
        return list(load_noisy_classifier(tmp_path / name)[0].state_dict().values())

    first = weights("a.pt")
    torch.rand(1000)  # what some other code drew before
    for a, b in zip(first, weights("b.pt")):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first, weights_of_seed(spec, config, tmp_path)))


def weights_of_seed(spec, config, tmp_path) -> list[torch.Tensor]:
    """The weights of the same classifier with seed + 1."""
    train_classifier(spec.model, spec.diffusion, "mnist", replace(config, seed=config.seed + 1), tmp_path / "c.pt",
                     tmp_path / "data", eval_images=0)
    return list(load_noisy_classifier(tmp_path / "c.pt")[0].state_dict().values())


def test_a_classifier_can_keep_levels_and_a_width_of_its_own(tmp_path):
    """ClassifierConfig.channel_mults and .base_channels shape the classifier and leave the
    denoiser alone; left at None, a classifier's file keeps the name it had before the fields
    existed."""
    write_fake_mnist(tmp_path / "data", n=24)
    spec = resolve_run("smoke")  # a UNet at (1, 2), 32 channels
    config = ClassifierConfig(steps=2, batch_size=8, channel_mults=[1, 4])
    assert config.channel_mults == (1, 4)
    train_classifier(spec.model, spec.diffusion, "mnist", config, tmp_path / "c.pt", tmp_path / "data", eval_images=0)
    classifier, _ = load_noisy_classifier(tmp_path / "c.pt")
    assert classifier.config.channel_mults == (1, 4) and spec.model.channel_mults == (1, 2)
    assert classifier.config.base_channels == spec.model.base_channels
    narrow = replace(config, base_channels=16)
    train_classifier(spec.model, spec.diffusion, "mnist", narrow, tmp_path / "n.pt", tmp_path / "data", eval_images=0)
    classifier, _ = load_noisy_classifier(tmp_path / "n.pt")
    assert classifier.config.base_channels == 16 and classifier.config.channel_mults == (1, 4)
    assert classifier.conv_in.out_channels == 16 and spec.model.base_channels == 32
    # the name the previous laptop classifier was cached under before the field existed
    plain, diffusion = ClassifierConfig(steps=4000, batch_size=64, lr=2e-3), DiffusionConfig("linear", 1000)
    assert classifier_path(tmp_path, plain, diffusion).name == "noisy_classifier-953bcaf1.pt"
    names = {classifier_path(tmp_path, changed, diffusion).name
             for changed in (plain, replace(plain, channel_mults=(1, 2, 4)), replace(plain, base_channels=16))}
    assert len(names) == 3
    with pytest.raises(ValueError, match="channel_mults must be positive"):
        ClassifierConfig(channel_mults=(1, 0))
    with pytest.raises(ValueError, match="base_channels must be a positive integer"):
        ClassifierConfig(base_channels=0)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_the_classifier_is_trained_once_per_configuration(dataset, tmp_path, fake_cifar_checksums):
    root = tmp_path / "data"
    if dataset == "mnist":
        write_fake_mnist(root, n=24)
        spec = resolve_run("smoke")
    else:
        fake_cifar_checksums(write_fake_cifar10(root, n=12))
        cifar_model = replace(resolve_run("smoke").model, image_size=32, in_channels=3, attention_resolutions=(16,))
        spec = replace(resolve_run("smoke"), dataset="cifar10", model=cifar_model)
    path = trained_classifier(spec, root, root=tmp_path / "runs")
    classifier, diffusion = load_noisy_classifier(path)
    assert diffusion == spec.diffusion and classifier.config.in_channels == spec.model.in_channels
    stamp = path.stat().st_mtime_ns
    assert trained_classifier(spec, root, root=tmp_path / "runs") == path and path.stat().st_mtime_ns == stamp
    # and it guides a class-conditional sampler's unconditional counterpart on that data
    model = UNet(spec.model).eval()
    y = torch.tensor([0, 9])
    (out,) = generate(model, 2, SamplerConfig("ddim", 5), y, schedule=NoiseSchedule.from_config(spec.diffusion),
                      classifier=classifier, guidance_scale=2.0)
    assert out.shape == (2, spec.model.in_channels, spec.model.image_size, spec.model.image_size)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_free_sampling_runs_for_rgb_images(sampler):
    """The CIFAR-10 shape (3 channels), both samplers, labels chosen per sample."""
    config = replace(TINY, in_channels=3, num_classes=10)
    model = randomize_(UNet(config).eval())
    y = torch.tensor([0, 5, 9])
    options = dict(sampler=sampler, num_steps=5 if sampler == "ddim" else None)
    plain = sample(model, SCHEDULE, (3, 3, 8, 8), y=y, generator=torch.Generator().manual_seed(0), **options).samples
    same = sample(ClassifierFreeGuidance(model, 0.0), SCHEDULE, (3, 3, 8, 8), y=y,
                  generator=torch.Generator().manual_seed(0), **options).samples
    guided = sample(ClassifierFreeGuidance(model, 3.0), SCHEDULE, (3, 3, 8, 8), y=y,
                    generator=torch.Generator().manual_seed(0), **options).samples
    torch.testing.assert_close(same, plain, atol=1e-4, rtol=1e-4)  # w = 0 is conditional sampling
    assert guided.shape == (3, 3, 8, 8) and not torch.allclose(guided, plain)
