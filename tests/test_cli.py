"""The command line, run as users run it (a subprocess of `python -m ddpm_core`)."""

import json
import subprocess
import sys

from PIL import Image


def run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "ddpm_core", *args], capture_output=True, text=True, timeout=300)


def test_demo_writes_both_sample_grids_and_the_schedule_plot(tmp_path):
    result = run_cli(
        "demo", "--out", str(tmp_path), "--timesteps", "30", "--num", "4", "--ddim-steps", "5", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["seconds"]) == {"ddpm", "ddim"}
    names = {"demo_samples_ddpm.png", "demo_samples_ddim.png", "schedules.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    for name in names:
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 20 and image.size[1] > 20


def test_bad_input_is_one_clear_line(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path), "--timesteps", "10", "--no-progress")
    assert result.returncode == 2
    assert "T >= 21 or the cosine schedule" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("demo", "--out", str(tmp_path), "--device", "tpu")
    assert result.returncode == 2 and "auto, cpu, cuda, mps" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written on bad input


def test_sample_refuses_missing_and_truncated_checkpoints(tmp_path):
    result = run_cli("sample", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "no checkpoint at" in result.stderr
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    result = run_cli("sample", "--checkpoint", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "not a readable ddpm_core.checkpoint file" in result.stderr
    assert not (tmp_path / "g.png").exists()


def smoke_checkpoint(tmp_path, mnist_root, **overrides):
    """A smoke-profile run trained for 2 steps on fake MNIST (in-process: seconds)."""
    from ddpm_core.runs import resolve_run, train_run

    spec = resolve_run("smoke", steps=2, sample_every=0, **overrides)
    out = tmp_path / ("conditional" if overrides else "unconditional")
    return train_run(spec, out, mnist_root).checkpoint


def test_guided_sampling_from_the_command_line(tmp_path):
    from fake_data import write_fake_mnist

    write_fake_mnist(tmp_path / "data", n=24)
    unconditional = smoke_checkpoint(tmp_path, tmp_path / "data")
    conditional = smoke_checkpoint(tmp_path, tmp_path / "data", num_classes=10, label_dropout=0.1)
    result = run_cli("train-classifier", "--checkpoint-dir", str(unconditional.parent), "--profile", "smoke",
                     "--data-root", str(tmp_path / "data"), "--steps", "3", "--eval-images", "8", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    classifier = unconditional.parent / "noisy_classifier.pt"
    assert report["classifier"] == str(classifier) and classifier.is_file()
    assert set(report["test_accuracy_by_t"]) >= {"0", "99"}  # JSON keys

    common = ("--sampler", "ddim", "--steps", "5", "--num", "4", "--no-progress")
    result = run_cli("sample", "--checkpoint", str(unconditional), "--classifier", str(classifier), "--class", "1", "7",
                     "--guidance-scale", "3", "--out", str(tmp_path / "cg.png"), *common)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["classes"] == [1, 7] and report["guidance"]["scale"] == 3.0 and (tmp_path / "cg.png").is_file()

    result = run_cli("sample", "--checkpoint", str(conditional), "--class", "4", "--guidance-weight", "2",
                     "--out", str(tmp_path / "cfg.png"), *common)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["guidance"] == {"classifier_free_weight": 2.0}

    for args, message in [
        (("--checkpoint", str(unconditional), "--class", "3"), "--class needs --classifier"),
        (("--checkpoint", str(unconditional), "--classifier", str(classifier)), "--classifier needs the classes"),
        (("--checkpoint", str(conditional), "--class", "3", "--classifier", str(classifier)), "--guidance-weight"),
        (("--checkpoint", str(unconditional), "--classifier", str(classifier), "--class", "12"), "labels 0 to 9"),
    ]:
        result = run_cli("sample", *args, "--out", str(tmp_path / "never.png"), *common)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "never.png").exists()
