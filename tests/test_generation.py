"""`generate`: the one road from a checkpoint (or a model) to uint8 images, guided or not."""

import pytest
import torch

from ddpm_core.checkpoint import Checkpoint
from ddpm_core.classifier import NoisyClassifier, save_noisy_classifier
from ddpm_core.config import DiffusionConfig, ModelConfig, SamplerConfig, replace
from ddpm_core.generation import default_batch_size, generate
from ddpm_core.guidance import ClassifierFreeGuidance, classifier_guidance
from ddpm_core.plotting import to_uint8
from ddpm_core.sampling import sample
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.unet import UNet

TINY = ModelConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0, norm_groups=8)
DIFFUSION = DiffusionConfig("linear", 30)
SCHEDULE = NoiseSchedule.from_config(DIFFUSION)
DDIM = SamplerConfig("ddim", 4, eta=1.0)


def model_of(config: ModelConfig = TINY) -> UNet:
    torch.manual_seed(0)
    model = UNet(config).eval()
    with torch.no_grad():  # the output convolution starts at zero: make the model say something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def checkpoint_of(model: UNet) -> Checkpoint:
    state = model.state_dict()
    return Checkpoint(model.config, DIFFUSION, state, state, metadata={"step": 1})


def test_batches_are_the_sampler_loop_with_one_generator():
    """5 images in batches of 2: the batches that `sample` draws one after another from one
    generator, quantised as files store them."""
    model = model_of()
    batches = list(generate(model, 5, DDIM, schedule=SCHEDULE, batch_size=2, seed=3))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and all(b.dtype == torch.uint8 for b in batches)
    generator = torch.Generator().manual_seed(3)
    expected = [to_uint8(sample(model, SCHEDULE, (n, 1, 8, 8), "ddim", 4, eta=1.0, generator=generator).samples)
                for n in (2, 2, 1)]
    for got, want in zip(batches, expected):
        assert torch.equal(got, want)


def test_a_checkpoint_samples_with_its_ema_weights_and_schedule():
    model = model_of()
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    checkpoint = Checkpoint(TINY, DIFFUSION, model.state_dict(), ema, metadata={})
    from_ema = torch.cat(list(generate(checkpoint, 3, DDIM, seed=1)))
    raw = torch.cat(list(generate(checkpoint, 3, DDIM, seed=1, use_ema=False)))
    assert torch.equal(raw, torch.cat(list(generate(model, 3, DDIM, schedule=SCHEDULE, seed=1))))
    assert not torch.equal(from_ema, raw)


def test_labels_cycle_and_guide_a_class_conditional_model_classifier_free():
    model = model_of(replace(TINY, num_classes=10))
    (images,) = generate(model, 5, DDIM, labels=[4, 7], schedule=SCHEDULE, guidance_weight=2.0, seed=2)
    expected = sample(ClassifierFreeGuidance(model, 2.0), SCHEDULE, (5, 1, 8, 8), "ddim", 4, eta=1.0,
                      y=torch.tensor([4, 7, 4, 7, 4]), generator=torch.Generator().manual_seed(2)).samples
    assert torch.equal(images, to_uint8(expected))
    (plain,) = generate(model, 5, DDIM, labels=[4, 7], schedule=SCHEDULE, seed=2)  # w None: conditional only
    expected = sample(model, SCHEDULE, (5, 1, 8, 8), "ddim", 4, eta=1.0, y=torch.tensor([4, 7, 4, 7, 4]),
                      generator=torch.Generator().manual_seed(2)).samples
    assert torch.equal(plain, to_uint8(expected))


def test_a_classifier_file_guides_an_unconditional_checkpoint(tmp_path):
    model, classifier = model_of(), NoisyClassifier(TINY)
    path = save_noisy_classifier(classifier, DIFFUSION, tmp_path / "classifier.pt")
    (images,) = generate(checkpoint_of(model), 2, DDIM, labels=[1, 8], classifier=path, guidance_scale=3.0, seed=4)
    expected = sample(model, SCHEDULE, (2, 1, 8, 8), "ddim", 4, eta=1.0, generator=torch.Generator().manual_seed(4),
                      guidance=classifier_guidance(classifier, torch.tensor([1, 8]), 3.0)).samples
    assert torch.equal(images, to_uint8(expected))
    other = save_noisy_classifier(classifier, DiffusionConfig("cosine", 30), tmp_path / "cosine.pt")
    with pytest.raises(ValueError, match="trained for .*cosine.*train a classifier for this checkpoint"):
        next(generate(checkpoint_of(model), 2, DDIM, labels=[1], classifier=other))


@pytest.mark.parametrize("conditional, options, message", [
    (False, dict(labels=[3]), "unconditional: drawing classes needs a noise-aware classifier"),
    (False, dict(classifier=NoisyClassifier(TINY)), "name them"),
    (True, dict(labels=[3], classifier=NoisyClassifier(TINY)), "class-conditional: guide it with guidance_weight"),
    (True, dict(labels=[10]), "classes 0 to 9"),
    (False, dict(labels=[-1], classifier=NoisyClassifier(TINY)), "classes 0 to 9"),
    (False, dict(labels=[]), "labels is empty"),
])
def test_combinations_that_cannot_work_are_refused_before_sampling(conditional, options, message):
    model = model_of(replace(TINY, num_classes=10) if conditional else TINY)
    with pytest.raises(ValueError, match=message):
        next(generate(model, 2, DDIM, schedule=SCHEDULE, **options))


def test_a_bare_model_needs_its_schedule_and_the_batch_size_follows_the_device():
    with pytest.raises(ValueError, match="needs the model's schedule"):
        generate(model_of(), 1, DDIM)  # refused at the call, before the first batch is asked for
    assert default_batch_size("cpu") == 64 and default_batch_size(torch.device("cuda", 0)) == 256


@pytest.mark.parametrize("source, options, message", [
    (ClassifierFreeGuidance(model_of(replace(TINY, num_classes=10)), 1.0), dict(labels=[3]),
     "pass the class-conditional model itself, with guidance_weight"),
    (model_of(), dict(batch_size=0), "batch_size >= 1"),
    (model_of(), dict(num_images=-1), "num_images >= 0"),
    (model_of(), dict(labels=[1], classifier=NoisyClassifier(TINY), guidance_scale=float("nan")), "finite"),
])
def test_bad_arguments_are_refused_at_the_call(source, options, message):
    options = {"num_images": 2, **options}
    with pytest.raises(ValueError, match=message):
        generate(source, sampler=DDIM, schedule=SCHEDULE, **options)
