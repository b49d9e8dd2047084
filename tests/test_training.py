"""The trainer: EMA, learning rate, batch order, monitoring that changes nothing, exact
resumption (in process after a crash, from a checkpoint of the old format, and after a real
SIGKILL), signals, and bad states.

In-process runs use a tiny UNet on 8x8 images (seconds each); the command-line runs on the
smoke profile are `slow` (`make test-slow`).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import TINY_UNET
from ddpm_core import monitor, train_state
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import DiffusionConfig, replace
from ddpm_core.files import TEMP_SUFFIX
from ddpm_core.plotting import plot_image_grid
from ddpm_core.schedule import NoiseSchedule
from ddpm_core.training import (
    EMA, NonFiniteLossError, TrainConfig, Trainer, TrainingInterrupted, epoch_batches, lr_factor, read_log,
)
from fake_data import write_fake_mnist

DIFFUSION = DiffusionConfig("linear", 50)
TRAIN = TrainConfig(steps=20, batch_size=8, lr=1e-3, warmup_steps=5, ema_decay=0.99, ema_warmup=True, log_every=5,
                    checkpoint_every=10, sample_images=4)
IMAGES = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (N, C, H, W) in [-1, 1]
DATASET = TensorDataset(IMAGES, torch.arange(40) % 10)
HOLDOUT = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def trainer(out: Path, holdout: torch.Tensor | None = None, model=TINY_UNET, **train_changes) -> Trainer:
    return Trainer(model, DIFFUSION, replace(TRAIN, **train_changes), DATASET, out, holdout=holdout)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders whose last.pt hold the same weights, EMA weights and Adam moments, and
    whose logs hold the same losses at the same steps."""
    first, second = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert first.train_state["step"] == second.train_state["step"]
    assert_same_weights(first.model_state, second.model_state)
    assert_same_weights(first.ema_state, second.ema_state)
    moments = [{k: v["exp_avg_sq"] for k, v in c.train_state["optimizer"]["state"].items()} for c in (first, second)]
    assert_same_weights(*moments)
    losses = [[(r["step"], r["loss"], r["lr"]) for r in read_log(folder / "log.jsonl") if "loss" in r]
              for folder in (a, b)]
    assert losses[0] == losses[1]


def crash_after(run: Trainer, step: int) -> None:
    """Run `run` until a RuntimeError kills it in the step after `step` (before that step trains)."""
    original = run.train_step

    def crash(x0, y):
        if run.step == step:
            raise RuntimeError("killed")
        return original(x0, y)

    run.train_step = crash
    with pytest.raises(RuntimeError, match="killed"):
        run.run()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A 20-step run that nothing interrupted or watched."""
    out = tmp_path_factory.mktemp("straight")
    trainer(out).run()
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """The same run killed after step 15: last.pt holds step 10, log.jsonl runs to step 15 and
    ends in half a line, and a write it was making left its temporary file."""
    out = tmp_path_factory.mktemp("crashed")
    crash_after(trainer(out), 15)
    assert load_checkpoint(out / "last.pt").train_state["step"] == 10
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [5, 10, 15]
    with (out / "log.jsonl").open("a") as log:
        log.write('{"step": 16, "lo')
    (out / f".best.pt.123{TEMP_SUFFIX}").write_bytes(b"half a file")
    return out


def resume_copy(crashed: Path, tmp_path: Path) -> Path:
    out = tmp_path / "resumed"
    shutil.copytree(crashed, out)
    return out


def test_ema_decay_and_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(5) == 0.9
    assert EMA(model, 0.999, warmup=True).decay_at(0) == pytest.approx(0.1)
    assert EMA(model, 0.999, warmup=True).decay_at(10**6) == 0.999
    # the ramp (1 + k) / (ramp + k) meets the cap at k = (ramp * cap - 1) / (1 - cap): 17,990 for
    # 0.9995 at ramp 10, longer than the laptop profile's 8,496 steps; 3,997 at ramp 3
    for ramp, cap, crossing in ((10.0, 0.9995, 17_990), (3.0, 0.9995, 3_997), (5.0, 0.99, 395)):
        ramped = EMA(model, cap, warmup=True, ramp=ramp)
        assert ramped.decay_at(crossing - 1) < cap and ramped.decay_at(crossing + 1) == cap
        assert ramped.decay_at(7) == pytest.approx(8 / (ramp + 7))
    with pytest.raises(ValueError, match="ema_ramp must be greater than 1"):
        TrainConfig(ema_warmup=True, ema_ramp=1.0)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=3)
    torch.testing.assert_close(ema.model.weight, 0.9 * before["weight"] + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_learning_rate_warms_up_then_stays_or_follows_a_half_cosine(tmp_path):
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
    run = trainer(tmp_path, steps=6, warmup_steps=2, lr_decay="cosine", lr=1e-3)
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


def test_training_lowers_the_loss_and_writes_its_log(straight):
    log = read_log(straight / "log.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert set(log[0]) == {"step", "loss", "lr", "images_per_s", "elapsed_s"}
    assert log[-1]["loss"] < log[0]["loss"]
    checkpoint = load_checkpoint(straight / "last.pt")
    assert checkpoint.train_state["step"] == 20 and checkpoint.metadata["step"] == 20
    assert not any((straight / name).exists() for name in ("best.pt", "samples", "snapshots"))


def test_monitoring_keeps_the_best_model_snapshots_and_grids_and_changes_nothing(straight, tmp_path):
    out = tmp_path / "watched"
    trainer(out, holdout=HOLDOUT, sample_every=10, snapshot_every=10).run()
    assert_same_run(straight, out)  # monitoring draws from its own generators
    assert {p.name for p in (out / "samples").iterdir()} == {"step_0000010.png", "step_0000020.png"}
    assert (out / "loss.png").stat().st_size > 1000
    heldout = [r for r in read_log(out / "log.jsonl") if "heldout_loss" in r]
    assert [r["step"] for r in heldout] == [10, 20]
    best = min(heldout, key=lambda r: r["heldout_loss"])
    checkpoint = load_checkpoint(out / "best.pt")
    assert checkpoint.metadata["step"] == best["step"]
    assert checkpoint.metadata["heldout_loss"] == pytest.approx(best["heldout_loss"])
    assert load_checkpoint(out / "last.pt").train_state["best_heldout_loss"] == pytest.approx(best["heldout_loss"])

    snapshots = sorted((out / "snapshots").iterdir())  # the EMA weights along the way, weights only
    assert [p.name for p in snapshots] == ["step_0000010.pt", "step_0000020.pt"]
    first, last = load_checkpoint(snapshots[0]), load_checkpoint(snapshots[1])
    assert (first.metadata["step"], last.metadata["step"], last.train_state) == (10, 20, None)
    final_ema = load_checkpoint(out / "last.pt").ema_state
    assert_same_weights(last.ema_state, final_ema)
    assert any(not torch.equal(first.ema_state[name], value) for name, value in final_ema.items())
    assert sum(p.stat().st_size for p in snapshots) < (out / "last.pt").stat().st_size  # no optimizer state


def test_a_notebooks_live_view_redraws_when_due_and_changes_nothing(straight, tmp_path, monkeypatch):
    from IPython.display import DisplayHandle

    from ddpm_core.widgets import TrainingView

    shown = []  # (what, handle id, figure), in order
    monkeypatch.setattr(DisplayHandle, "display", lambda self, figure: shown.append(("display", self.display_id, figure)))
    monkeypatch.setattr(DisplayHandle, "update", lambda self, figure: shown.append(("update", self.display_id, figure)))
    out = tmp_path / "viewed"
    view = TrainingView(every=10, images=3, sampler_steps=4, seed=7)
    trainer(out).run(extra_hooks=[view])
    assert_same_run(straight, out)  # the view samples with its own generator and only reads the log

    # due at the first log line (5), every 10 steps and at the last (20): two handles, displayed once
    assert [(what, handle) for what, handle, _ in shown] == [
        ("display", view.curve.display_id), ("display", view.grid.display_id)] + [
        ("update", view.curve.display_id), ("update", view.grid.display_id)] * 2
    curves, grids = shown[0::2], shown[1::2]
    assert [c[2]._suptitle.get_text() for c in curves] == ["step 5 of 20", "step 10 of 20", "step 20 of 20"]
    last_curve = curves[-1][2].axes[0].lines[0]  # the training loss, every log line so far
    assert list(last_curve.get_xdata()) == [5, 10, 15, 20]
    # the last grid is the final EMA weights sampled from the view's noise
    final = load_checkpoint(out / "last.pt").build_model()
    expected = monitor.grid_samples(final, NoiseSchedule.from_config(DIFFUSION), (3, 1, 8, 8), 4, seed=7)
    drawn, wanted = (torch.as_tensor(figure.axes[0].images[0].get_array().data)
                     for figure in (grids[-1][2], plot_image_grid(expected, nrow=3)))
    assert drawn.shape == (8 + 4, 3 * (8 + 2) + 2, 3)  # one row of 3 images, torchvision's 2-pixel padding
    torch.testing.assert_close(drawn, wanted)
    assert grids[-1][2].axes[0].get_title() == "EMA samples at step 20 (DDIM, 4 steps)"


def test_the_live_views_interval_and_its_refusals():
    from ddpm_core.widgets import TrainingView

    assert TrainingView().interval(1800, 25) == 225  # laptop: an eighth of the run, whole log windows
    assert TrainingView().interval(20, 5) == 5  # smoke: at least one log window
    assert TrainingView(every=7).interval(1800, 25) == 7
    for bad in ({"every": -1}, {"images": 0}, {"sampler_steps": 0}):
        with pytest.raises(ValueError, match="TrainingView needs"):
            TrainingView(**bad)


def test_a_crashed_run_resumes_to_the_run_that_never_stopped(straight, crashed, tmp_path, monkeypatch):
    out = resume_copy(crashed, tmp_path)
    reads, plotted = [], []
    monkeypatch.setattr(train_state, "read_log", lambda path: reads.append(path) or read_log(path))
    monkeypatch.setattr(monitor, "plot_loss_curve", lambda records, weighting="uniform", objective=None: plotted.append(list(records))
                        or monitor.Figure())
    # checkpoints every 5 steps now (a resumed run may change how it is watched): 15 and 20
    trainer(out, checkpoint_every=5).run(resume=True)
    assert_same_run(straight, out)
    assert not list(out.glob(f"*{TEMP_SUFFIX}"))  # the killed write's leftover is gone
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [5, 10, 15, 20]  # no duplicate, no half line
    assert len(reads) == 1  # the log is read once, at the start; the loss curve is drawn from memory
    assert len(plotted) == 2 and plotted[-1] == read_log(out / "log.jsonl")


def test_a_checkpoint_from_before_the_shared_generator_resumes_exactly(straight, crashed, tmp_path):
    """The old one-process last.pt had no shared_rng: its global RNG (torch_rng) drew t and eps."""
    out = resume_copy(crashed, tmp_path)
    payload = torch.load(out / "last.pt", weights_only=True)
    state = payload["train_state"]
    state["torch_rng"] = state.pop("shared_rng")
    torch.save(payload, out / "last.pt")
    trainer(out).run(resume=True)
    assert_same_run(straight, out)


def test_t_drawn_by_loss_starts_as_the_uniform_run_and_resumes_exactly(straight, tmp_path):
    """timestep_sampling "loss": uniform draws (the same run) until every t holds ten losses,
    then draws by them; the history travels in last.pt, so a crashed run resumes exactly."""
    whole = tmp_path / "whole"
    trainer(whole, steps=180, checkpoint_every=160, timestep_sampling="loss").run()
    early = [(r["step"], r["loss"]) for r in read_log(whole / "log.jsonl") if "loss" in r][:4]
    uniform = [(r["step"], r["loss"]) for r in read_log(straight / "log.jsonl") if "loss" in r]
    # the same draws; the loss is summed per sample first, so equal up to float rounding
    assert [step for step, _ in early] == [step for step, _ in uniform] == [5, 10, 15, 20]
    assert [loss for _, loss in early] == pytest.approx([loss for _, loss in uniform], rel=1e-5)

    out = tmp_path / "crashed"
    crash_after(trainer(out, steps=180, checkpoint_every=160, timestep_sampling="loss"), 170)
    history = load_checkpoint(out / "last.pt").train_state["timestep_history"]
    assert (history["seen"] >= 10).all()  # step 160 draws by the losses already
    trainer(out, steps=180, checkpoint_every=160, timestep_sampling="loss").run(resume=True)
    assert_same_run(whole, out)
    finished = load_checkpoint(whole / "last.pt").train_state["timestep_history"]
    assert int(finished["seen"].sum()) == 180 * 8 and not torch.equal(finished["losses"], history["losses"])


def test_a_signal_stops_after_the_step_with_last_pt_saved(tmp_path):
    run = trainer(tmp_path, steps=10)
    original = run.train_step

    def signalled_in_step_3(x0, y):
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded; the step still finishes
        return original(x0, y)

    run.train_step = signalled_in_step_3
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 3") as stopped:
        run.run()
    assert stopped.value.signum == signal.SIGTERM and stopped.value.checkpoint == tmp_path / "last.pt"
    assert load_checkpoint(tmp_path / "last.pt").train_state["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # the handlers are put back


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run = trainer(tmp_path, steps=30, checkpoint_every=5)
    original = run.train_step

    def poisoned(x0, y):
        return original(x0 * float("nan") if run.step == 7 else x0, y)

    run.train_step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"at step 8.*step 5"):
        run.run()
    assert load_checkpoint(tmp_path / "last.pt").train_state["step"] == 5


def edited(folder: Path, edit) -> Path:
    """A copy of `folder`'s run whose last.pt `edit` changed (a dict -> None function)."""
    copy = folder.parent / f"{folder.name}-edited-{len(list(folder.parent.iterdir()))}"
    shutil.copytree(folder, copy)
    payload = torch.load(copy / "last.pt", weights_only=True)
    edit(payload)
    torch.save(payload, copy / "last.pt")
    return copy


def test_bad_resume_states_are_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer(tmp_path / "none", steps=2).run(resume=True)
    run = tmp_path / "run"
    trainer(run, steps=2).run()
    before = (run / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        trainer(run, steps=4).run()
    refusals = [
        (run, dict(model=replace(TINY_UNET, base_channels=64)), "another configuration"),
        (run, dict(lr=2e-3, seed=1), r"other settings \(lr 0.001 -> 0.002; seed 0 -> 1\)"),
        (edited(run, lambda p: p["train_state"].update(world_size=2)), {}, r"trained by 2 process\(es\)"),
        (edited(run, lambda p: p["train_state"].pop("optimizer")), {}, "training state is damaged"),
        (edited(run, lambda p: p["train_state"].update(shared_rng="garbage")), {}, "training state is damaged"),
        (edited(run, lambda p: p.update(train_state=None)), {}, "holds weights only"),
    ]
    for folder, changes, message in refusals:
        with pytest.raises(ValueError, match=message) as refused:
            trainer(folder, **{"steps": 4, **changes}).run(resume=True)
        assert "\n" not in str(refused.value)
    assert (run / "last.pt").read_bytes() == before  # nothing saved was overwritten


def test_train_command_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from ddpm_core.cli import main

    monkeypatch.setenv("DDPM_THREADS", str(torch.get_num_threads()))  # no load measurement per call
    for args, message in (
        (["--profile", "huge"], "smoke, laptop, mnist-gpu, cifar10-paper"),
        (["--profile", "smoke", "--dataset", "imagenet"], "mnist, cifar10, folder"),
        (["--profile", "smoke", "--schedule", "sigmoid"], "linear, cosine"),
        (["--profile", "smoke", "--dataset", "cifar10"], "profiles for cifar10: cifar10-paper"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["train", "--out", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "run").exists()


# -- the real command, killed for real --------------------------------------------------------
def run_train(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ddpm_core", "train", "--profile", "smoke", "--out", str(out),
               "--data-root", str(root), "--device", "cpu", "--no-progress", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three smoke runs of the command line (minutes on a busy 2-core CPU)
def test_sigkill_then_resume_equals_a_run_that_never_stopped(tmp_path):
    root = tmp_path / "data"
    write_fake_mnist(root, n=48)
    steps = ["--steps", "40"]
    straight = run_train(root, tmp_path / "straight", *steps)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    victim = run_train(root, tmp_path / "killed", *steps)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # kill it once it has checkpointed (every 10 steps) and moved on
        if log.exists() and any(json.loads(l)["step"] >= 15 for l in log.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(tmp_path / "killed" / "last.pt").train_state["step"]
    assert 10 <= killed_at < 40

    resumed = run_train(root, tmp_path / "killed", *steps, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert b.train_state["step"] == 40
    assert_same_weights(a.model_state, b.model_state)
    assert_same_weights(a.ema_state, b.ema_state)


def test_the_loss_curve_names_the_objective_the_run_trained_on():
    records = [{"step": 10, "loss": 0.02}, {"step": 20, "loss": 0.01}, {"step": 20, "heldout_loss": 0.1}]
    labels = {w: [t.get_text() for t in monitor.plot_loss_curve(records, w).axes[0].get_legend().get_texts()]
              for w in ("uniform", "p2", "min_snr")}
    assert labels["uniform"] == ["training loss (L_simple)", "held-out L_simple, EMA weights"]
    assert labels["p2"][0] == "training loss (L_simple weighted by P2)"
    assert labels["min_snr"][0] == "training loss (L_simple weighted by Min-SNR)"
