"""Sample quality the paper's way: FID and Inception Score of generated images against cached
statistics of the training set.

This module owns the feature extractors (torch-fidelity's TF-equivalent InceptionV3, or the
clean-MNIST judge for a laptop-sized MNIST FID), the cached reference statistics, and the
scores. The statistics and the distances themselves are torchmetrics' (`FrechetInceptionDistance`,
`InceptionScore`); features are extracted once per image and handed to both metrics. Images
are scored as files store them: clipped to [-1, 1] and quantised to uint8.

Protocol (Ho et al. 2020, Sec. 4; PAPER_FACTS): 50,000 samples against the CIFAR-10 training
set, Inception features of torch-fidelity's port of the TF graph (resized inside it). Small-n
FID is biased upward, so the real-vs-real value at the same n (`Evaluator.floor`) is the
number to compare with, and the MNIST FID is not comparable with Inception FID.

The likelihood side of the paper (Table 1's NLL column) is here too as far as the test set
goes: `test_set_bound` runs `ddpm_core.likelihood`'s bound over N test images.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.image import FrechetInceptionDistance, InceptionScore
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from ddpm_core.checkpoint import atomic_save, safe_load
from ddpm_core.config import DatasetName, MetricName, VarianceName, check_choice
from ddpm_core.data import make_dataset
from ddpm_core.judge import DigitClassifier, load_digit_classifier
from ddpm_core.likelihood import Bound, variational_bound
from ddpm_core.plotting import to_uint8
from ddpm_core.runtime import progress_bar
from ddpm_core.schedule import NoiseSchedule

log = logging.getLogger(__name__)

INCEPTION_FILE = Path(URL_INCEPTION_V3).name  # weights-inception-2015-12-05-6726825d.pth
STATS_FORMAT = "ddpm_core.reference_stats"


class InceptionWeightsUnavailable(FileNotFoundError):
    """The Inception weights are not on disk and could not be downloaded."""


def inception_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """The InceptionV3 weights file: `path` if given, else torch's hub cache (downloaded there
    on first use). The file is read once with `weights_only=True` before torch-fidelity loads it."""
    target = Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not target.is_file():
        how = (f"Download {URL_INCEPTION_V3} on a machine with internet and copy it to {target}, "
               f"or pass --inception-weights PATH (inception_weights=PATH in Python)")
        if path is not None or not download:
            raise InceptionWeightsUnavailable(f"no Inception weights at {target}. {how}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
        except Exception as error:  # URLError, HTTPError, OSError, ... offline
            raise InceptionWeightsUnavailable(
                f"the Inception weights ({INCEPTION_FILE}) are not at {target} and could not be downloaded "
                f"({type(error).__name__}: {error}). {how}") from error
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{target} is not a plain weights file (truncated, or a pickle that would run code, "
                         f"which is refused); download {INCEPTION_FILE} again") from error
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{target} is not torch-fidelity's InceptionV3 state dict ({INCEPTION_FILE})")
    return target


class InceptionFeatures(nn.Module):
    """uint8 (B, 3 or 1, H, W) -> (2048 pool features, 1008 unbiased logits), one pass.

    torch-fidelity's InceptionV3 reproduces the TF graph of the FID/IS papers, bilinear resize
    to 299 x 299 included; grey images are repeated to three channels.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
        self.num_features = 2048
        self.identity = f"inception-{INCEPTION_FILE.split('-')[-1].split('.')[0]}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        features, logits = self.net(images)
        return features, logits


class DigitFeatures(nn.Module):
    """uint8 (B, 1, 28, 28) -> (128 penultimate features, 10 logits) of the clean-MNIST judge."""

    def __init__(self, judge: DigitClassifier):
        super().__init__()
        self.judge = judge.eval()
        self.num_features = judge.head[-1].in_features  # 128
        digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in judge.state_dict().values()))
        self.identity = f"mnist-judge-{digest.hexdigest()[:8]}"  # new judge weights, new reference

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.judge.features(images.float() / 127.5 - 1.0)
        return features, self.judge.head(features)


class _Precomputed(nn.Module):
    """The "feature extractor" torchmetrics sees: features arrive already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_metric(num_features: int, reference: dict[str, torch.Tensor] | None = None) -> FrechetInceptionDistance:
    """torchmetrics' FID over precomputed features, its real-set statistics loaded from
    `reference` (a dict written by `reference_state`) when given."""
    metric = FrechetInceptionDistance(feature=_Precomputed(num_features), reset_real_features=False)
    metric.persistent(True)  # the states (feature sums and their outer products) are the cache
    if reference is not None:
        metric.load_state_dict(reference, strict=False)
    return metric


def reference_state(metric: FrechetInceptionDistance) -> dict[str, torch.Tensor]:
    """The real-set statistics of `metric`: count, sum and sum of outer products (float64)."""
    return {k: v.detach().cpu() for k, v in metric.state_dict().items() if k.startswith("real_")}


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D), computed by torchmetrics."""
    metric = fid_metric(real.shape[1])
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return metric.compute().item()


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' Inception Score of logits (N, K): mean and std over `splits` shuffled splits
    (the shuffle is seeded, so the score is reproducible)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # one split: no spread
        mean, std = metric.compute()
    return mean.item(), std.item() if splits > 1 else 0.0


def dataset_batches(dataset: DatasetName, data_root: str | Path | None, train: bool, num_images: int | None = None,
                    batch_size: int = 250, seed: int = 0) -> Iterator[torch.Tensor]:
    """uint8 batches of a dataset (no flips): all of it, or `num_images` drawn at random."""
    data = make_dataset(dataset, data_root, train=train, flip=False)
    if num_images is not None:
        if num_images > len(data):
            raise ValueError(f"asked for {num_images} {dataset} images, the split has {len(data)}")
        data = Subset(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num_images])
    for x, _ in DataLoader(data, batch_size=batch_size):
        yield to_uint8(x)


def test_set_bound(model: nn.Module, schedule: NoiseSchedule, dataset: DatasetName, data_root: str | Path | None,
                   num_images: int, batch_size: int = 100, variance: VarianceName = "fixedlarge", seed: int = 0,
                   progress: bool = False) -> Bound:
    """The variational bound (`likelihood.variational_bound`) of `num_images` test images drawn
    at random (by `seed`), `batch_size` at a time, one forward pass per t per batch; the x_t
    are drawn from a generator seeded by `seed` too, so the same call gives the same numbers."""
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = [variational_bound(model, schedule, images.to(device).float() / 127.5 - 1, variance,
                               generator=generator, progress=progress)
             for images in dataset_batches(dataset, data_root, False, num_images, batch_size, seed)]
    return Bound(*(torch.cat(pieces) for pieces in zip(*parts)))


class Evaluator:
    """One feature extractor and the training set's cached statistics: FID and IS of images.

    metric: "inception" (the paper's protocol) or "mnist" (the judge's features; cheap, and not
    comparable with Inception FID). The reference statistics are cached in `cache_dir` under a
    name that holds the extractor's identity, the dataset and the split.
    """

    def __init__(self, metric: MetricName, dataset: DatasetName, cache_dir: str | Path,
                 data_root: str | Path | None = None, device: str | torch.device = "cpu",
                 judge: str | Path | None = None, inception: str | Path | None = None,
                 batch_size: int = 250, progress: bool = False):
        check_choice(metric, MetricName, "metric")
        if metric == "mnist" and dataset != "mnist":
            raise ValueError(f"the mnist metric reads 28x28 digits; use --metric inception for {dataset}")
        if metric == "mnist" and judge is None:
            raise ValueError("the mnist metric needs the judge's file (classifier_runs.trained_judge makes one)")
        self.metric, self.dataset, self.data_root = metric, dataset, data_root
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress
        extractor = (DigitFeatures(load_digit_classifier(judge)) if metric == "mnist"
                     else InceptionFeatures(inception_weights(inception)))
        self.extractor = extractor.to(self.device).eval()
        self.num_features = self.extractor.num_features
        self.reference_file = Path(cache_dir) / f"{self.extractor.identity}-{dataset}-train.pt"
        self.reference = self._reference()

    @torch.inference_mode()
    def features(self, batches: Iterable[torch.Tensor], total: int | None = None,
                 desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) and logits (N, K) on the CPU, float64, of uint8 image batches."""
        features, logits = [], []
        for images in progress_bar(batches, total=total, desc=desc, disable=not self.progress, leave=False):
            if images.dtype != torch.uint8:
                raise TypeError(f"score images as stored: uint8 in [0, 255] (plotting.to_uint8), got {images.dtype}")
            batch_features, batch_logits = self.extractor(images.to(self.device))
            features.append(batch_features.double().cpu())
            logits.append(batch_logits.double().cpu())
        return torch.cat(features), torch.cat(logits)

    def _reference(self) -> dict[str, torch.Tensor]:
        if self.reference_file.is_file():
            payload = safe_load(self.reference_file, STATS_FORMAT, "delete it to recompute")
            return payload["state"]
        log.info("computing the %s training-set statistics for %s", self.dataset, self.extractor.identity)
        features, _ = self.features(dataset_batches(self.dataset, self.data_root, True, batch_size=self.batch_size),
                                    desc=f"{self.dataset} train statistics")
        metric = fid_metric(self.num_features)
        metric.update(features, real=True)
        state = reference_state(metric)
        atomic_save({"format": STATS_FORMAT, "state": state, "extractor": self.extractor.identity,
                     "dataset": self.dataset, "split": "train", "num_images": len(features)}, self.reference_file)
        return state

    @property
    def reference_size(self) -> int:
        return int(self.reference["real_features_num_samples"])

    def reference_mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set's feature mean (D,) and covariance (D, D), from the cached sums."""
        n, total, outer = self.reference_size, self.reference["real_features_sum"], self.reference["real_features_cov_sum"]
        mean = total / n
        return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)

    def fid(self, features: torch.Tensor) -> float:
        """FID of a feature set (N, D) against the training set."""
        metric = fid_metric(self.num_features, self.reference)
        metric.update(features, real=False)
        return metric.compute().item()

    def score(self, batches: Iterable[torch.Tensor], total: int | None = None, seed: int = 0) -> dict:
        """FID and IS of uint8 image batches (generated samples, or real images for a floor)."""
        features, logits = self.features(batches, total)
        mean, std = inception_score(logits, seed=seed)
        return {"fid": self.fid(features), "inception_score": mean, "inception_score_std": std,
                "num_images": len(features)}

    def floor(self, num_images: int, seed: int = 0) -> dict:
        """The real-vs-real score at `num_images`: held-out test images (training images, which
        the reference contains, when the test split is smaller) against the training set."""
        test_size = len(make_dataset(self.dataset, self.data_root, train=False, flip=False))
        train = num_images > test_size
        batches = dataset_batches(self.dataset, self.data_root, train, num_images, self.batch_size, seed)
        return {**self.score(batches, seed=seed), "split": "train" if train else "test"}
