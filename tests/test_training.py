"""The trainer: EMA, batch order, exact resumption (also after a real SIGKILL), bad states."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import replace
from ddpm_core.data import make_dataset
from ddpm_core.profiles import get_profile
from ddpm_core.training import EMA, NonFiniteLossError, TrainConfig, Trainer, epoch_batches, lr_factor
from fake_data import write_fake_mnist

SMOKE = get_profile("smoke")


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n=48)
    return root


def trainer(root: Path, out: Path, holdout: torch.Tensor | None = None, **train_changes) -> Trainer:
    train = replace(SMOKE.train, **{"sample_every": 0, **train_changes})
    return Trainer(SMOKE.model, SMOKE.diffusion, train, make_dataset("mnist", root, download=False), out,
                   holdout=holdout)


def test_ema_decay_and_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(5) == 0.9
    assert EMA(model, 0.999, warmup=True).decay_at(0) == pytest.approx(0.1)
    assert EMA(model, 0.999, warmup=True).decay_at(10**6) == 0.999
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=3)
    torch.testing.assert_close(ema.model.weight, 0.9 * before["weight"] + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_learning_rate_warms_up_then_stays_or_follows_a_half_cosine(mnist_root, tmp_path):
    constant = TrainConfig(steps=100, warmup_steps=10)
    cosine = replace(constant, lr_decay="cosine")
    for k in range(10):  # linear warmup: update k runs at (k + 1) / warmup of the peak
        assert lr_factor(constant, k) == lr_factor(cosine, k) == pytest.approx((k + 1) / 10)
    assert lr_factor(constant, 99) == 1.0
    progress = {10: 0.0, 55: 0.5, 100: 1.0}  # (k - warmup) / (steps - warmup)
    for k, p in progress.items():
        assert lr_factor(cosine, k) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert lr_factor(cosine, 55) == pytest.approx(0.5) and lr_factor(cosine, 100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="constant, cosine"):
        replace(constant, lr_decay="step")
    run = trainer(mnist_root, tmp_path, steps=6, warmup_steps=2, lr_decay="cosine", lr=1e-3)
    seen = []
    for _ in range(6):  # the optimizer applies what lr_factor says, update after update
        seen.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        run.scheduler.step()
    assert seen == pytest.approx([1e-3 * lr_factor(run.config, k) for k in range(6)])


def test_epoch_batches_are_full_permutations_and_resume_exactly():
    straight = [b for _, b in zip(range(12), epoch_batches(10, 3, seed=4, start_step=0))]
    assert all(len(b) == 3 for b in straight)
    assert sorted(sum(straight[:3], [])) == sorted(set(sum(straight[:3], [])))  # no repeat in an epoch
    assert straight[:3] != straight[3:6]  # a new order each epoch
    resumed = [b for _, b in zip(range(7), epoch_batches(10, 3, seed=4, start_step=5))]
    assert resumed == straight[5:12]
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(epoch_batches(2, 3, 0, 0))


def test_training_lowers_the_loss_and_writes_its_log(mnist_root, tmp_path):
    result = trainer(mnist_root, tmp_path, steps=20).run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert set(log[0]) == {"step", "loss", "lr", "images_per_s", "elapsed_s"}
    assert log[-1]["loss"] < log[0]["loss"]
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.train_state["step"] == 20 and checkpoint.metadata["step"] == 20


def test_monitoring_keeps_the_best_model_and_changes_nothing(mnist_root, tmp_path):
    holdout = torch.stack([x for x, _ in make_dataset("mnist", mnist_root, train=False, download=False)][:8])
    watched = trainer(mnist_root, tmp_path / "watched", holdout=holdout, steps=20, sample_every=10, sample_images=4)
    watched.run()
    plain = trainer(mnist_root, tmp_path / "plain", steps=20)
    plain.run()
    for name, value in plain.model.state_dict().items():  # monitoring draws from its own generators
        assert torch.equal(value, watched.model.state_dict()[name]), name
    out = tmp_path / "watched"
    assert {p.name for p in (out / "samples").iterdir()} == {"step_0000010.png", "step_0000020.png"}
    assert (out / "loss.png").stat().st_size > 1000
    heldout = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "heldout_loss" in r]
    assert [r["step"] for r in heldout] == [10, 20]
    best = min(heldout, key=lambda r: r["heldout_loss"])
    checkpoint = load_checkpoint(out / "best.pt")
    assert checkpoint.metadata["step"] == best["step"]
    assert checkpoint.metadata["heldout_loss"] == pytest.approx(best["heldout_loss"])
    assert load_checkpoint(out / "last.pt").train_state["best_heldout_loss"] == pytest.approx(best["heldout_loss"])
    assert not (tmp_path / "plain" / "best.pt").exists()


def test_snapshots_keep_the_ema_weights_along_the_way(mnist_root, tmp_path):
    run = trainer(mnist_root, tmp_path, steps=20, snapshot_every=10)
    run.run()
    snapshots = sorted((tmp_path / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["step_0000010.pt", "step_0000020.pt"]
    first, last = load_checkpoint(snapshots[0]), load_checkpoint(snapshots[1])
    assert (first.metadata["step"], last.metadata["step"], last.train_state) == (10, 20, None)
    final_ema = load_checkpoint(tmp_path / "last.pt").ema_state
    for name, value in final_ema.items():
        assert torch.equal(last.ema_state[name], value), name
    assert any(not torch.equal(first.ema_state[name], value) for name, value in final_ema.items())
    assert sum(p.stat().st_size for p in snapshots) < (tmp_path / "last.pt").stat().st_size  # no optimizer state


def test_resume_gives_the_same_weights_as_a_straight_run(mnist_root, tmp_path):
    straight = trainer(mnist_root, tmp_path / "a", steps=12)
    straight.run()
    trainer(mnist_root, tmp_path / "b", steps=6).run()
    resumed = trainer(mnist_root, tmp_path / "b", steps=12)
    resumed.run(resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in straight.ema.model.state_dict().items():
        assert torch.equal(value, resumed.ema.model.state_dict()[name]), name


def run_train(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ddpm_core", "train", "--profile", "smoke", "--out", str(out),
               "--data-root", str(root), "--device", "cpu", "--no-progress", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_equals_a_run_that_never_stopped(mnist_root, tmp_path):
    steps = ["--steps", "40"]
    straight = run_train(mnist_root, tmp_path / "straight", *steps)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    victim = run_train(mnist_root, tmp_path / "killed", *steps)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it once it has checkpointed (every 10 steps) and moved on
        if log.exists() and any(json.loads(l)["step"] >= 15 for l in log.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(tmp_path / "killed" / "last.pt").train_state["step"]
    assert 10 <= killed_at < 40

    resumed = run_train(mnist_root, tmp_path / "killed", *steps, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert b.train_state["step"] == 40
    for name, value in a.model_state.items():
        assert torch.equal(value, b.model_state[name]), name
    for name, value in a.ema_state.items():
        assert torch.equal(value, b.ema_state[name]), name


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(mnist_root, tmp_path, monkeypatch):
    run = trainer(mnist_root, tmp_path, steps=30, checkpoint_every=10)
    original = run.train_step

    def poisoned(x0, y):
        return original(x0 * float("nan") if run.step == 14 else x0, y)

    monkeypatch.setattr(run, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"at step 15.*step 10"):
        run.run()
    assert load_checkpoint(tmp_path / "last.pt").train_state["step"] == 10


def test_bad_resume_states_are_refused(mnist_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer(mnist_root, tmp_path / "none", steps=2).run(resume=True)
    trainer(mnist_root, tmp_path / "run", steps=2).run()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        trainer(mnist_root, tmp_path / "run", steps=4).run()
    other = Trainer(replace(SMOKE.model, base_channels=64), SMOKE.diffusion, replace(SMOKE.train, steps=4),
                    make_dataset("mnist", mnist_root, download=False), tmp_path / "run")
    with pytest.raises(ValueError, match="another configuration"):
        other.run(resume=True)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # nothing saved was overwritten


def test_train_command_bad_input_is_one_clear_line(tmp_path):
    def train(*args):
        return subprocess.run([sys.executable, "-m", "ddpm_core", "train", "--out", str(tmp_path / "run"), *args],
                              capture_output=True, text=True, timeout=120)

    for args, message in (
        (["--profile", "huge"], "smoke, laptop, mnist-gpu, cifar10-paper"),
        (["--profile", "smoke", "--dataset", "imagenet"], "mnist, cifar10, folder"),
        (["--profile", "smoke", "--data-root", str(tmp_path / "nothing")], "could not be downloaded"),
        (["--profile", "smoke", "--schedule", "sigmoid"], "linear, cosine"),
        (["--profile", "smoke", "--dataset", "cifar10"], "profiles for cifar10: cifar10-paper"),
    ):
        result = train(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
