"""The clean-MNIST judge: shapes, verdicts, training on learnable data, safe files, and its
accuracy on the real MNIST test set where ../shared/data exists."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ddpm_core.checkpoint import Checkpoint, save_checkpoint
from ddpm_core.config import DiffusionConfig
from ddpm_core.data import make_dataset
from ddpm_core.judge import (
    CONFIDENT, DigitClassifier, classifier_accuracy, judge, load_digit_classifier, save_digit_classifier,
    train_digit_classifier,
)
from conftest import TINY_UNET
from test_data import SHARED_DATA


def pattern_digits(n: int, seed: int = 0) -> TensorDataset:
    """Ten easy classes: class k lights up row band k of a 28x28 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = -torch.ones(n, 1, 28, 28)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, 2 * k + 4: 2 * k + 6, 4:24] = 1.0
    images = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    return TensorDataset(images, labels)


class FixedLogits(nn.Module):
    """A stand-in classifier that returns given logits, to check the verdict's arithmetic."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, x):
        return self.logits[: len(x)]


def test_shapes_and_wrong_input():
    model = DigitClassifier()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.features(torch.zeros(3, 1, 28, 28)).shape == (3, 128)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.zeros(3, 3, 32, 32))


def test_verdict_counts_only_confident_samples():
    # rows: sure 3, sure 3, sure 7, unsure (softmax of equal logits = 0.1 each)
    logits = torch.zeros(4, 10)
    logits[0, 3] = logits[1, 3] = logits[2, 7] = 20.0
    verdict = judge(FixedLogits(logits), torch.zeros(4, 1, 28, 28))
    assert verdict.labels[:3].tolist() == [3, 3, 7]
    assert verdict.class_counts == (0, 0, 0, 2, 0, 0, 0, 1, 0, 0)
    assert verdict.confident_fraction == pytest.approx(0.75)
    assert verdict.classes_seen == 2
    assert verdict.confidence[3].item() == pytest.approx(0.1) and verdict.confidence[3] < CONFIDENT


def test_uint8_images_are_judged_like_their_float_values():
    model = DigitClassifier().eval()
    as_bytes = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    as_float = as_bytes.float() / 127.5 - 1.0
    torch.testing.assert_close(judge(model, as_bytes).confidence, judge(model, as_float).confidence)


def test_training_learns_separable_classes_and_survives_a_round_trip(tmp_path):
    model = train_digit_classifier(pattern_digits(640), epochs=1, batch_size=32, lr=3e-3)
    assert classifier_accuracy(model, pattern_digits(200, seed=1)) > 0.95  # chance is 0.1
    path = save_digit_classifier(model, tmp_path / "judge.pt", {"accuracy": 1.0})
    loaded = load_digit_classifier(path)
    x = pattern_digits(20, seed=2).tensors[0]
    torch.testing.assert_close(loaded(x), model(x))


def test_a_diffusion_checkpoint_is_not_taken_for_a_judge(tmp_path):
    path = save_checkpoint(Checkpoint(TINY_UNET, DiffusionConfig("linear", 100), {}), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a ddpm_core.digit_classifier file"):
        load_digit_classifier(path)
    with pytest.raises(FileNotFoundError, match="train one"):
        load_digit_classifier(tmp_path / "missing.pt")


@pytest.mark.slow  # about a minute of training on a 2-core CPU
@pytest.mark.skipif(not (SHARED_DATA / "MNIST").exists(), reason="the real MNIST is not in ../shared/data")
def test_judge_reaches_98_percent_on_the_real_mnist_test_set():
    model = train_digit_classifier(make_dataset("mnist", SHARED_DATA), epochs=1)
    assert classifier_accuracy(model, make_dataset("mnist", SHARED_DATA, train=False)) >= 0.98
