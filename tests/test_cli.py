"""The command line's commands end to end, through `ddpm_core.cli.main` in-process (what
`python -m ddpm_core` runs; tests/test_bad_input.py runs the real entry point, for signals)."""

import json

import pytest
from PIL import Image

from conftest import run_main

pytestmark = pytest.mark.usefixtures("fixed_threads")  # in-process main(): no load measurement, no thread change


def test_demo_writes_both_sample_grids_and_the_schedule_plot(tmp_path, capsys):
    code, out, err = run_main(capsys, "demo", "--out", tmp_path, "--timesteps", "30", "--num", "4",
                              "--ddim-steps", "5", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert set(report["seconds"]) == {"ddpm", "ddim"} and all(s >= 0 for s in report["seconds"].values())
    names = {"demo_samples_ddpm.png", "demo_samples_ddim.png", "schedules.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert {str(tmp_path / name) for name in names} == set(report["files"])
    for name in names:
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 20 and image.size[1] > 20


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    code, _, err = run_main(capsys, "demo", "--out", tmp_path, "--timesteps", "10", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "T >= 21 or the cosine schedule" in err and "Traceback" not in err
    code, _, err = run_main(capsys, "demo", "--out", tmp_path, "--device", "tpu")
    assert code == 2 and "auto, cpu, cuda, mps" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written on bad input


def test_sample_refuses_missing_and_truncated_checkpoints(tmp_path, capsys):
    code, _, err = run_main(capsys, "sample", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "g.png")
    assert code == 2 and "no checkpoint at" in err and err.count("\n") == 1
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_main(capsys, "sample", "--checkpoint", tmp_path / "cut.pt", "--out", tmp_path / "g.png")
    assert code == 2 and "not a readable ddpm_core.checkpoint file" in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def smoke_checkpoint(tmp_path, mnist_root, **overrides):
    """A smoke-profile run trained for 2 steps on fake MNIST (in-process: seconds)."""
    from ddpm_core.runs import resolve_run, train_run

    spec = resolve_run("smoke", steps=2, sample_every=0, **overrides)
    out = tmp_path / ("conditional" if overrides else "unconditional")
    return train_run(spec, out, mnist_root, holdout_images=2).checkpoint


def test_guided_sampling_from_the_command_line(tmp_path, capsys):
    from fake_data import write_fake_mnist

    write_fake_mnist(tmp_path / "data", n=24)
    unconditional = smoke_checkpoint(tmp_path, tmp_path / "data")
    conditional = smoke_checkpoint(tmp_path, tmp_path / "data", num_classes=10, label_dropout=0.1)
    classifier = tmp_path / "classifier.pt"  # --out: the default name is the run folder's business
    code, out, err = run_main(capsys, "train-classifier", "--checkpoint-dir", unconditional.parent, "--out", classifier,
                              "--profile", "smoke", "--data-root", tmp_path / "data", "--steps", "3",
                              "--eval-images", "8", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["classifier"] == str(classifier) and classifier.is_file()
    assert set(report["test_accuracy_by_t"]) >= {"0", "99"}  # JSON keys
    assert all(0 <= accuracy <= 1 for accuracy in report["test_accuracy_by_t"].values())

    common = ("--sampler", "ddim", "--steps", "5", "--num", "4", "--no-progress")
    code, out, err = run_main(capsys, "sample", "--checkpoint", unconditional, "--classifier", classifier,
                              "--class", "1", "7", "--guidance-scale", "3", "--out", tmp_path / "cg.png", *common)
    assert code == 0, err
    report = json.loads(out)
    assert report["classes"] == [1, 7] and report["guidance"]["scale"] == 3.0 and (tmp_path / "cg.png").is_file()

    code, out, err = run_main(capsys, "sample", "--checkpoint", conditional, "--class", "4", "--guidance-weight", "2",
                              "--out", tmp_path / "cfg.png", *common)
    assert code == 0, err
    assert json.loads(out)["guidance"] == {"classifier_free_weight": 2.0}

    for args, message in [
        (("--checkpoint", unconditional, "--class", "3"), "--class needs --classifier"),
        (("--checkpoint", unconditional, "--classifier", classifier), "--classifier needs the classes"),
        (("--checkpoint", conditional, "--class", "3", "--classifier", classifier), "--guidance-weight"),
        (("--checkpoint", unconditional, "--classifier", classifier, "--class", "12"), "labels 0 to 9"),
    ]:
        code, _, err = run_main(capsys, "sample", *args, "--out", tmp_path / "never.png", *common)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "never.png").exists()
