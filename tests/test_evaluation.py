"""FID and IS: the Frechet distance against scipy, its properties, the Inception Score's closed
forms, the cached reference statistics, the Inception weights' errors, and the evaluate command."""

import json
import urllib.error
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

from ddpm_core import evaluation
from ddpm_core.data import make_dataset
from ddpm_core.evaluation import (
    INCEPTION_FILE, DigitFeatures, Evaluator, InceptionFeatures, InceptionWeightsUnavailable, frechet_distance,
    inception_score, inception_weights,
)
from ddpm_core.judge import DigitClassifier, save_digit_classifier
from ddpm_core.plotting import to_uint8
from conftest import run_main
from fake_data import write_fake_cifar10, write_fake_mnist


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n=40)
    return root


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)  # an untrained judge: its features are a fixed random CNN's, enough for the plumbing
    return save_digit_classifier(DigitClassifier(), tmp_path_factory.mktemp("judge") / "judge.pt")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as its state dict (no download)."""
    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        net = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def bars(n: int, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1], (n, 1, 28, 28): one bright bar each, at random places."""
    rng = np.random.default_rng(seed)
    images = -np.ones((n, 1, 28, 28), dtype=np.float32)
    for image in images:
        row, col, length = rng.integers(2, 14), rng.integers(2, 24), rng.integers(8, 14)
        if rng.random() < 0.5:
            image[0, row: row + length, col: col + 3] = 1.0
        else:
            image[0, col: col + 3, row: row + length] = 1.0
    return torch.from_numpy(images)


def test_frechet_distance_matches_scipy_on_random_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    real = rng.multivariate_normal(rng.normal(size=6), a @ a.T, size=2000)
    fake = rng.multivariate_normal(rng.normal(size=6), b @ b.T + np.eye(6), size=1500)
    mu1, mu2 = real.mean(0), fake.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert frechet_distance(torch.from_numpy(real), torch.from_numpy(fake)) == pytest.approx(expected, rel=1e-6)
    assert expected > 1.0  # the two Gaussians differ: the comparison is not 0 == 0


def test_fid_is_zero_for_a_set_against_itself_and_grows_with_noise(judge_file):
    evaluator_features = DigitFeatures(evaluation.load_digit_classifier(judge_file))
    clean = bars(400)
    with torch.inference_mode():
        reference = evaluator_features(to_uint8(clean))[0].double()
        assert frechet_distance(reference, reference) == pytest.approx(0.0, abs=1e-6 * reference.var(0).sum().item())
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(clean.shape, generator=generator)
        fids = [frechet_distance(reference, evaluator_features(to_uint8(clean + sigma * noise))[0].double())
                for sigma in (0.05, 0.2, 0.5, 1.0)]
    assert all(later > earlier for earlier, later in zip(fids, fids[1:])), fids


def test_inception_score_closed_forms():
    labels = torch.arange(1000) % 10
    confident = 50.0 * torch.nn.functional.one_hot(labels, 10).double()  # sure, and every class equally often
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(confident, splits=10)[0] == pytest.approx(10.0, rel=0.05)  # shuffled splits
    assert inception_score(50.0 * torch.nn.functional.one_hot(torch.arange(400) % 4, 10).double(), splits=1)[0] == \
        pytest.approx(4.0, rel=1e-6)
    assert inception_score(torch.zeros(100, 10), splits=1)[0] == pytest.approx(1.0)  # unsure: no information
    one_class = 50.0 * torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 10).double()
    assert inception_score(one_class, splits=1)[0] == pytest.approx(1.0)  # sure, but no diversity
    assert inception_score(confident, seed=3) == inception_score(confident, seed=3)  # seeded shuffle


def test_reference_statistics_are_the_training_sets_and_cached(mnist_root, judge_file, tmp_path, monkeypatch):
    evaluator = Evaluator("mnist", "mnist", tmp_path, mnist_root, judge=judge_file)
    assert evaluator.reference_size == 40 and evaluator.reference_file.is_file()
    images = torch.stack([x for x, _ in make_dataset("mnist", mnist_root, download=False)])
    with torch.inference_mode():
        features = evaluator.extractor(to_uint8(images))[0].double()
    mean, cov = evaluator.reference_mean_cov()
    torch.testing.assert_close(mean, features.mean(0))
    torch.testing.assert_close(cov, torch.cov(features.T))
    assert evaluator.fid(features) == pytest.approx(0.0, abs=1e-6 * cov.trace().item())

    monkeypatch.setattr(evaluation, "make_dataset", mock.Mock(side_effect=AssertionError("recomputed")))
    cached = Evaluator("mnist", "mnist", tmp_path, mnist_root, judge=judge_file)
    for name, value in evaluator.reference.items():
        assert torch.equal(value, cached.reference[name]), name


def test_scores_and_the_real_vs_real_floor(mnist_root, judge_file, tmp_path):
    evaluator = Evaluator("mnist", "mnist", tmp_path, mnist_root, judge=judge_file)
    floor = evaluator.floor(16)
    assert floor["split"] == "test" and floor["num_images"] == 16
    assert floor["fid"] > 0 and 1.0 <= floor["inception_score"] <= 10.0
    noise = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8).split(8)
    assert set(evaluator.score(noise)) == {"fid", "inception_score", "inception_score_std", "num_images"}
    with pytest.raises(ValueError, match="asked for 100 mnist images"):
        evaluator.floor(100)
    with pytest.raises(TypeError, match="uint8"):
        evaluator.score([torch.zeros(4, 1, 28, 28)])
    with pytest.raises(ValueError, match="metric inception for cifar10"):
        Evaluator("mnist", "cifar10", tmp_path, judge=judge_file)
    with pytest.raises(ValueError, match="valid choices|one of"):
        Evaluator("lenet", "mnist", tmp_path, judge=judge_file)


def test_inception_features_take_grey_and_colour_images(inception_file):
    extractor = InceptionFeatures(inception_weights(inception_file))
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        features, logits = extractor(grey)
        rgb_features, _ = extractor(grey.expand(-1, 3, -1, -1).contiguous())
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(features, rgb_features)


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    offline = mock.Mock(side_effect=urllib.error.URLError("no network"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionWeightsUnavailable) as error:
        inception_weights()
    message = str(error.value)
    assert INCEPTION_FILE in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--inception-weights" in message and "URLError" in message
    with pytest.raises(InceptionWeightsUnavailable, match="no Inception weights at"):
        inception_weights(tmp_path / "elsewhere.pth")
    assert offline.call_count == 1  # an explicit path is never downloaded over

    (tmp_path / "code.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="refused"):
        inception_weights(tmp_path / "code.pth")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torch-fidelity's InceptionV3"):
        inception_weights(tmp_path / "other.pth")


def test_cifar10_reference_through_torchvision_and_inception(tmp_path, inception_file, fake_cifar_checksums):
    fake_cifar_checksums(write_fake_cifar10(tmp_path / "data", n=4))
    evaluator = Evaluator("inception", "cifar10", tmp_path / "stats", tmp_path / "data", inception=inception_file)
    assert evaluator.reference_size == 20  # the five training batches, the test batch left out
    assert evaluator.reference_file.name == "inception-6726825d-cifar10-train.pt"
    floor = evaluator.floor(4)
    assert floor["split"] == "test" and np.isfinite(floor["fid"])


def test_evaluate_command_writes_every_field(mnist_root, judge_file, inception_file, tmp_path, capsys, fixed_threads):
    from ddpm_core.runs import resolve_run, train_run

    checkpoint = train_run(resolve_run("smoke", steps=2, sample_every=0), tmp_path / "run", mnist_root).checkpoint
    common = ("--checkpoint", str(checkpoint), "--num-samples", "6", "--batch-size", "4", "--data-root",
              str(mnist_root), "--stats-dir", str(tmp_path / "stats"), "--judge", str(judge_file), "--no-progress")
    code, out, err = run_main(capsys, "evaluate", *common, "--sampler", "ddim", "--steps", "3", "--out", tmp_path / "m.json")
    assert code == 0, err
    report = json.loads((tmp_path / "m.json").read_text())
    assert report == json.loads(out)
    assert set(report) == {
        "metric", "feature_extractor", "fid", "inception_score", "inception_score_std", "num_samples", "checkpoint",
        "checkpoint_step", "ema", "sampler", "steps", "variance", "eta", "spacing", "guidance_weight", "seed",
        "batch_size", "reference", "device", "seconds", "samples_per_s", "note", "floor",
    }
    assert (report["metric"], report["sampler"], report["steps"], report["num_samples"]) == ("mnist", "ddim", 3, 6)
    assert report["ema"] is True and report["checkpoint_step"] == 2 and report["variance"] is None
    assert report["reference"] == {"dataset": "mnist", "split": "train", "num_images": 40,
                                   "file": str(tmp_path / "stats" / f"{report['feature_extractor']}-mnist-train.pt")}
    assert report["floor"]["num_images"] == 6 and report["floor"]["split"] == "test"
    assert report["fid"] > 0 and report["floor"]["fid"] > 0

    # the other sampler and no EMA (the Inception features themselves: test_cifar10_reference_... above)
    code, out, err = run_main(capsys, "evaluate", *common, "--sampler", "ddpm", "--variance", "fixedsmall", "--no-ema",
                              "--no-floor", "--out", tmp_path / "ddpm.json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["metric"], report["steps"], report["variance"], report["ema"]) == ("mnist", 100, "fixedsmall", False)
    assert "floor" not in report and report["eta"] is None and report["spacing"] is None

    # --nll N alone: the bound of N test images, term by term, beside nothing else
    code, out, err = run_main(capsys, "evaluate", *common[:2], "--num-samples", "0", "--nll", "3", "--data-root",
                              str(mnist_root), "--no-progress", "--variance", "fixedsmall", "--out", tmp_path / "nll.json")
    assert code == 0, err
    report = json.loads(out)
    assert "fid" not in report and report["checkpoint_step"] == 2
    nll = report["nll"]
    assert (nll["num_images"], nll["split"], nll["variance"], nll["timesteps"]) == (3, "test", "fixedsmall", 100)
    assert nll["bits_per_dim"] == pytest.approx(nll["rate"] + nll["distortion"])
    assert nll["rate"] == pytest.approx(nll["prior_L_T"] + nll["kl_terms"])
    assert 0 < nll["prior_L_T"] < 1e-4 and nll["images_per_s"] > 0
    assert set(nll["terms_by_t"]) == {"L_0", "L_1..L_9", "L_10..L_99"}

    for args, message in [
        (("--num-samples", "1"), ">= 2"),
        (("--num-samples", "0"), "nothing to evaluate"),
        (("--sampler", "ddpm", "--steps", "10"), "use sampler='ddim'"),
        (("--metric", "inception", "--inception-weights", str(tmp_path / "none.pth")), "no Inception weights at"),
    ]:
        code, _, err = run_main(capsys, "evaluate", *common, *args, "--out", tmp_path / "never.json")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never.json").exists()
