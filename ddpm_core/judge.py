"""The independent judge: a small CNN trained on clean MNIST that says which digit a generated
image shows and how sure it is.

This module owns that classifier, its training, and the verdict on a batch of samples. It is
deliberately not the guidance classifier (which sees noisy x_t and t): a model that is judged
by the network that steered it would grade its own homework. Its penultimate features also
serve as the feature space of the MNIST FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddpm_core.checkpoint import atomic_save, check_state, safe_load
from ddpm_core.runtime import progress_bar

FORMAT = "ddpm_core.digit_classifier"
CONFIDENT = 0.9  # a sample counts as a recognisable digit when the judge gives it >= 90%


class DigitClassifier(nn.Module):
    """Two conv blocks and two linear layers: (B, 1, 28, 28) in [-1, 1] -> (B, 10) logits.

    About 99% test accuracy after two epochs; `features` gives the 128-dimensional
    penultimate activations (the MNIST FID's feature space).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Dropout(0.25),
            nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),  # (B, feature_dim)
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"the digit classifier takes (B, 1, 28, 28) images in [-1, 1], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digit_classifier(dataset: Dataset, epochs: int = 2, batch_size: int = 128, lr: float = 1e-3,
                           device: str | torch.device = "cpu", seed: int = 0,
                           progress: bool = False) -> DigitClassifier:
    """Train the judge on (image, label) pairs in [-1, 1] with Adam and cross-entropy."""
    torch.manual_seed(seed)
    model = DigitClassifier().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for x, y in progress_bar(loader, disable=not progress, desc="digit judge"):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.inference_mode()
def classifier_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> float:
    """The fraction of `dataset` that `model` labels correctly."""
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / total


@dataclass(frozen=True)
class Verdict:
    """The judge's view of a batch: per-image labels and confidences, and their summary."""

    labels: torch.Tensor  # (B,) the most likely digit
    confidence: torch.Tensor  # (B,) its probability
    class_counts: tuple[int, ...]  # confident samples per digit 0..9

    @property
    def confident_fraction(self) -> float:
        """The fraction of samples the judge calls a digit with at least CONFIDENT probability."""
        return (self.confidence >= CONFIDENT).float().mean().item()

    @property
    def classes_seen(self) -> int:
        """How many of the ten digits appear among the confident samples."""
        return sum(count > 0 for count in self.class_counts)


@torch.inference_mode()
def judge(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> Verdict:
    """Classify generated images (B, 1, 28, 28): floats in [-1, 1] or uint8 in [0, 255]."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    images = images.clamp(-1.0, 1.0)  # as saved images are
    device = next(model.parameters()).device
    probs = torch.cat([model(chunk.to(device)).softmax(1).cpu() for chunk in images.split(batch_size)])
    confidence, labels = probs.max(1)
    counts = torch.bincount(labels[confidence >= CONFIDENT], minlength=probs.shape[1])
    return Verdict(labels, confidence, tuple(counts.tolist()))


def save_digit_classifier(model: DigitClassifier, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the judge's weights atomically, with plain-data metadata (test accuracy, ...)."""
    return atomic_save({"format": FORMAT, "state": model.state_dict(), "metadata": metadata or {}}, path)


def load_digit_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """Read a judge written by `save_digit_classifier` (weights only; no pickled code runs)."""
    payload = safe_load(Path(path), FORMAT, "train one with train_digit_classifier", map_location)
    model = DigitClassifier()
    check_state(payload.get("state"), model, Path(path))
    model.load_state_dict(payload["state"])
    return model.eval()
