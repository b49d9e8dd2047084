"""Nothing a user types loses work or ends in a traceback: the command line against bad input,
damaged files, full disks, two runs in one folder, and Ctrl-C.

Every refusal is checked the same way (`assert_refused`): exit status 2, one line on stderr
that names the offending value or file, no traceback, and every file that existed before is
byte-identical afterwards. Argument and file cases call `ddpm_core.cli.main` in-process (the
function `python -m ddpm_core` runs; seconds for dozens of cases); what needs a process
boundary (signals and the exit statuses 130 and 143, a lock held by another live process)
runs `python -m ddpm_core` for real. The full two-process run is `slow` (`make test-slow`).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_main as cli

SMOKE_STEPS = 2
pytestmark = pytest.mark.usefixtures("fixed_threads")  # in-process main(): no load measurement, no thread change


# -- helpers --------------------------------------------------------------------------------


def snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_refused(code: int, err: str, *needles: str, before: dict | None = None, status: int = 2) -> None:
    assert code == status, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    if before is not None:
        assert snapshot(*{p.parent for p in before}) == before, "a file that existed before was changed"


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (Python's default accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def on_fake_mnist(root: Path) -> tuple:
    """`train`'s data options: the fake MNIST in `root`, and each checkpoint's held-out loss
    on 2 of its test images (not all 24: seconds a checkpoint on a busy CPU)."""
    return "--data-root", root, "--holdout-images", "2"


def run_process(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpm_core", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    from fake_data import write_fake_mnist

    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n=24)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_root) -> Path:
    """A smoke run of SMOKE_STEPS steps (in-process): its folder, last.pt inside."""
    from ddpm_core.runs import resolve_run, train_run

    out = tmp_path_factory.mktemp("runs") / "smoke"
    train_run(resolve_run("smoke", steps=SMOKE_STEPS, sample_every=0), out, mnist_root, holdout_images=2)
    return out


def edited(trained: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the run's last.pt whose payload `edit` changed in place."""
    payload = torch.load(trained / "last.pt", weights_only=True)
    edit(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def nan_weights(payload):
    payload["ema_state"]["conv_in.weight"][0, 0, 0, 0] = float("nan")


# -- checkpoints that are not what they claim ---------------------------------------------
BAD_CHECKPOINTS = {
    "zero bytes": (lambda path: path.write_bytes(b""), "is empty"),
    "a text file": (lambda path: path.write_text("hello, I am not a checkpoint\n"), "not a readable"),
    "random bytes": (lambda path: path.write_bytes(os.urandom(300)), "not a readable"),
    "another PyTorch file": (lambda path: torch.save({"weights": torch.ones(2)}, path), "marker"),
    "a pickle that runs code": (lambda path: path.write_bytes(
        b"cos\nsystem\n(S'touch /tmp/ddpm_pwned'\ntR."), "not a readable"),
}
EDITS = {
    "another channel count": (lambda p: p["model_config"].update(base_channels=64), "do not fit"),
    "an unknown setting": (lambda p: p["model_config"].update(colour="red"), "colour"),
    "a missing setting": (lambda p: p["model_config"].pop("base_channels"), "lacks base_channels"),
    "a string for a number": (lambda p: p["model_config"].update(image_size="28"), "image_size"),
    "a list for a dict": (lambda p: p.update(diffusion_config=["linear", 100]), "diffusion_config is list"),
    "an invalid value": (lambda p: p["diffusion_config"].update(num_timesteps=1), "num_timesteps"),
    "missing weights": (lambda p: p["model_state"].pop("conv_in.weight"), "missing ['conv_in.weight']"),
    "no weights at all": (lambda p: p.update(model_state=None), "not a dict of tensors"),
    "NaN weights": (nan_weights, "NaN or inf"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_unreadable_checkpoints_are_one_line(case, tmp_path, capsys):
    write, message = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.pt"
    write(path)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "sample", "--checkpoint", path, "--out", tmp_path / "grid.png", "--no-progress")
    assert_refused(code, err, str(path), message, before=before)
    assert not Path("/tmp/ddpm_pwned").exists()


@pytest.mark.parametrize("case", EDITS)
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_edited_checkpoints_are_one_line_naming_the_file(case, command, trained, tmp_path, capsys):
    edit, message = EDITS[case]
    path = edited(trained, tmp_path, "edited.pt", edit)
    before = snapshot(tmp_path)
    out = tmp_path / ("grid.png" if command == "sample" else "metrics.json")
    code, _, err = cli(capsys, command, "--checkpoint", path, "--out", out, "--no-progress")
    assert_refused(code, err, str(path), message, before=before)


def test_damaged_guidance_classifier_and_resume_state(trained, mnist_root, tmp_path, capsys):
    classifier = tmp_path / "classifier.pt"
    classifier.write_bytes(b"")
    code, _, err = cli(capsys, "sample", "--checkpoint", trained / "last.pt", "--class", "3",
                       "--classifier", classifier, "--out", tmp_path / "g.png", "--no-progress")
    assert_refused(code, err, str(classifier), "empty")

    run = tmp_path / "run"
    run.mkdir()
    edited(trained, run, "last.pt", lambda p: p["train_state"].pop("optimizer"))
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", *on_fake_mnist(mnist_root), "--no-progress")
    assert_refused(code, err, str(run / "last.pt"), "training state is damaged", before=before)


# -- numbers that are not numbers -----------------------------------------------------------
BAD_NUMBERS = [
    ("sample", "--num", "0", ">= 1"), ("sample", "--num", "-3", ">= 1"), ("sample", "--batch-size", "0", ">= 1"),
    ("sample", "--grid-size", "0", ">= 1"), ("sample", "--grid-size", "-1", ">= 1"),
    ("sample", "--steps", "0", ">= 1"), ("sample", "--eta", "nan", "finite"), ("sample", "--eta", "inf", "finite"),
    ("sample", "--eta", "-1", ">= 0"), ("sample", "--guidance-scale", "nan", "finite"),
    ("sample", "--guidance-scale", "inf", "finite"), ("sample", "--guidance-weight", "nan", "finite"),
    ("sample", "--seed", "abc", "not a whole number"), ("sample", "--class", "-1", ">= 0"),
    ("sample", "--threads", "0", ">= 1"),
    ("evaluate", "--num-samples", "1", ">= 2"), ("evaluate", "--batch-size", "0", ">= 1"),
    ("evaluate", "--guidance-weight", "nan", "finite"), ("evaluate", "--steps", "-5", ">= 1"),
    ("train", "--lr", "nan", "finite number > 0"), ("train", "--lr", "0", "> 0"), ("train", "--lr", "1e400", "> 0"),
    ("train", "--steps", "0", ">= 1"), ("train", "--batch-size", "0", ">= 1"), ("train", "--holdout-images", "0", ">= 1"),
    ("train", "--seed", "-1", ">= 0"), ("train", "--label-dropout", "1", "[0, 1)"), ("train", "--num-workers", "-1", ">= 0"),
    ("train", "--base-channels", "8", ">= 16"), ("train", "--steps", "1.5", "not a whole number"),
    ("train-classifier", "--lr", "nan", "finite"), ("train-classifier", "--eval-images", "-1", ">= 0"),
    ("train-classifier", "--steps", "0", ">= 1"),
    ("demo", "--num", "0", ">= 1"), ("demo", "--timesteps", "1", ">= 2"), ("demo", "--ddim-steps", "0", ">= 1"),
    ("notebooks", "--threads", "-2", ">= 1"),
]
REQUIRED = {"sample": ["--checkpoint", "x.pt"], "evaluate": ["--checkpoint", "x.pt"], "train": ["--out", "never"],
            "train-classifier": ["--checkpoint-dir", "never"], "demo": ["--out", "never"], "notebooks": []}


@pytest.mark.parametrize("command, option, value, message", BAD_NUMBERS)
def test_numeric_options_are_checked_at_the_boundary(command, option, value, message, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, command, *REQUIRED[command], option, value)
    assert_refused(code, err, option, message, "--help")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_values_the_parser_cannot_see_are_refused_by_the_configs(trained, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "run", "--profile", "smoke", "--base-channels", "36")
    assert_refused(code, err, "must divide into norm_groups=8")
    code, _, err = cli(capsys, "sample", "--checkpoint", trained / "last.pt", "--sampler", "ddpm", "--steps", "10",
                       "--out", tmp_path / "g.png", "--no-progress")
    assert_refused(code, err, "takes all T = 100 steps")
    assert not (tmp_path / "g.png").exists()


# -- resume that ignores what you asked -----------------------------------------------------
@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of the trained run, so that tests may resume it."""
    folder = tmp_path / "run"
    folder.mkdir()
    for path in trained.rglob("*"):
        if path.is_file():
            target = folder / path.relative_to(trained)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return folder


@pytest.mark.parametrize("option, value, named", [
    ("--lr", "0.5", "lr 0.001 -> 0.5"), ("--batch-size", "4", "batch_size 8 -> 4"), ("--seed", "3", "seed 0 -> 3"),
    ("--lr-decay", "cosine", "lr_decay"), ("--profile", "laptop", "profile 'smoke' -> 'laptop'"),
    ("--schedule", "cosine", "schedule"), ("--no-attention", None, "attention"),
    ("--steps", "1", "past the 1 steps"),
])
def test_resume_refuses_what_it_would_silently_ignore(option, value, named, run_copy, capsys):
    before = snapshot(run_copy)
    code, _, err = cli(capsys, "train", "--out", run_copy, "--resume", option, *([value] if value else []),
                       "--no-progress")
    assert_refused(code, err, str(run_copy), named, before=before)


def test_resume_honours_more_steps_and_says_so(run_copy, mnist_root, capsys):
    code, out, err = cli(capsys, "train", "--out", run_copy, "--resume", "--steps", "4", *on_fake_mnist(mnist_root),
                         "--no-progress")
    assert code == 0, err
    assert "steps 2 -> 4" in err
    report = strict_json(out)
    assert report["step"] == 4 and report["resumed_with"] == {"steps": [2, 4]}
    # a finished run resumed trains nothing and says so in valid JSON
    code, out, err = cli(capsys, "train", "--out", run_copy, "--resume", *on_fake_mnist(mnist_root), "--no-progress")
    assert code == 0, err
    report = strict_json(out)
    assert report["step"] == 4 and report["final_loss"] is None


def test_resume_cleans_what_a_killed_run_left(run_copy, mnist_root, capsys):
    log = run_copy / "log.jsonl"
    kept = log.read_text()
    # what a run killed after its checkpoint at step 2 leaves: log lines past it, a half line, temporary files
    log.write_text(kept + json.dumps({"step": 3, "loss": 0.5}) + "\n" + '{"step": 4, "lo')
    orphans = [run_copy / ".last.k3j2.tmp.pt", run_copy / "snapshots" / ".step_0000005.x.tmp.pt"]
    for path in orphans:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a checkpoint")
    code, _, err = cli(capsys, "train", "--out", run_copy, "--resume", "--steps", "5", *on_fake_mnist(mnist_root),
                       "--no-progress")
    assert code == 0, err
    steps = [record["step"] for record in map(strict_json, log.read_text().splitlines()) if "loss" in record]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # no duplicates, no half line
    assert log.read_text().startswith(kept)
    assert not any(path.exists() for path in orphans)


# -- outputs ---------------------------------------------------------------------------------
def test_outputs_are_checked_before_the_work(trained, tmp_path, capsys):
    checkpoint, a_file = trained / "last.pt", tmp_path / "notes.txt"
    a_file.write_text("keep me")
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    cases = [
        (["sample", "--out", tmp_path / "folder"], "is a folder"),
        (["sample", "--out", tmp_path / "g.png", "--save-tensor", tmp_path / "folder"], "is a folder"),
        (["sample", "--out", tmp_path / "g.png", "--save-tensor", a_file / "x.pt"], str(a_file)),
        (["sample", "--out", tmp_path / "g.png", "--save-images", a_file], "is a file, not a folder"),
        (["evaluate", "--out", a_file / "metrics.json", "--num-samples", "2"], str(a_file)),
    ]
    for args, message in cases:
        start = time.perf_counter()
        code, _, err = cli(capsys, *args[:1], "--checkpoint", checkpoint, *args[1:], "--no-progress")
        assert_refused(code, err, message, before=before)
        assert time.perf_counter() - start < 5  # refused up front, not after sampling
    assert not (tmp_path / "g.png").exists()
    code, _, err = cli(capsys, "train", "--out", a_file, "--profile", "smoke")
    assert_refused(code, err, "is a file, not a folder", before=before)


def fill_disk_while_writing(monkeypatch):
    """Fake a full disk for PNG writes: half the bytes reach the file, then ENOSPC."""
    from PIL import Image

    original = Image.Image.save

    def save(image, fp, *args, **kwargs):
        original(image, fp, *args, **kwargs)
        data = Path(fp).read_bytes()
        Path(fp).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", save)


def small_filesystem(tmp_path: Path) -> Path | None:
    """A 16 KiB tmpfs (root only), or None where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    return mount if done.returncode == 0 else None


@pytest.mark.parametrize("how", ["full filesystem", "faked ENOSPC"])
def test_a_full_disk_keeps_the_previous_grid(how, trained, tmp_path, capsys, monkeypatch):
    folder = small_filesystem(tmp_path) if how == "full filesystem" else tmp_path
    if folder is None:
        pytest.skip("mounting a small tmpfs needs root here; the faked ENOSPC case covers the code path")
    try:
        grid = folder / "grid.png"
        common = ("sample", "--checkpoint", trained / "last.pt", "--sampler", "ddim", "--steps", "1", "--no-progress")
        code, _, err = cli(capsys, *common, "--num", "1", "--out", grid)  # a small grid that fits
        assert code == 0, err
        before = snapshot(folder)
        if how == "faked ENOSPC":
            fill_disk_while_writing(monkeypatch)  # any grid fails: a small one does
        # a grid of 64 noise images (~120 KB) does not fit in 16 KiB
        num = "64" if how == "full filesystem" else "4"
        code, _, err = cli(capsys, *common, "--num", num, "--grid-size", num, "--out", grid)
        assert_refused(code, err, str(grid), "no space left", "previous file", before=before)
        assert [p.name for p in folder.iterdir()] == ["grid.png"]  # no temporary file left behind
    finally:
        if how == "full filesystem":
            subprocess.run(["umount", str(folder)], check=True)


# -- two runs, one folder; interrupts (real processes) ---------------------------------------
def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused(mnist_root, tmp_path):
    """Two real processes: the second is refused, the first finishes as the only writer.
    (The default run checks the refusal in-process against a live process: the next test.)"""
    out = tmp_path / "run"
    train = ("train", "--profile", "smoke", "--out", out, *on_fake_mnist(mnist_root), "--steps", "3", "--no-progress",
             "--threads", "1")
    first = run_process(*train)
    try:
        wait_for(lambda: (out / ".lock").exists())
        first.send_signal(signal.SIGSTOP)  # keep it busy while the second one starts
        second = run_process(*train)
        _, err = second.communicate(timeout=120)
        assert_refused(second.returncode, err, str(out), f"in use by process {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    out_text, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert strict_json(out_text)["step"] == 3
    steps = [strict_json(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one writer
    assert not (out / ".lock").exists()  # released on exit


def test_interrupts_save_a_checkpoint_say_how_to_resume_and_hold_the_folder_meanwhile(mnist_root, tmp_path, capsys):
    """SIGINT (exit 130) and SIGTERM (143) to two real `python -m ddpm_core train` processes,
    run side by side; while the first trains, a second run into its folder is refused."""
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signal.Signals(signum).name
        runs[signum] = out, run_process("train", "--profile", "smoke", "--out", out, *on_fake_mnist(mnist_root),
                                        "--steps", "100000", "--no-progress", "--threads", "1")
    try:
        for out, _ in runs.values():
            log = out / "log.jsonl"
            wait_for(lambda: log.exists() and log.stat().st_size > 0)  # step 5 logged: training is under way
        out, busy = runs[signal.SIGINT]
        code, _, err = cli(capsys, "train", "--profile", "smoke", "--out", out, *on_fake_mnist(mnist_root),
                           "--steps", "3", "--no-progress")
        assert_refused(code, err, str(out), f"in use by process {busy.pid}")
        for signum, (_, process) in runs.items():
            process.send_signal(signum)
        finished = {signum: process.communicate(timeout=120)[1] for signum, (_, process) in runs.items()}
    finally:
        for _, process in runs.values():
            process.kill()  # no-op once it has exited
    from ddpm_core.checkpoint import load_checkpoint

    for signum, status in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
        (out, process), err = runs[signum], finished[signum]
        assert_refused(process.returncode, err, signal.Signals(signum).name, "--resume", str(out), status=status)
        step = load_checkpoint(out / "last.pt").metadata["step"]
        assert f"after step {step};" in err and step >= 5
        assert not (out / ".lock").exists()
        records = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses = [record["step"] for record in records if "loss" in record]
        assert losses == sorted(set(losses))  # one writer
        assert max(record["step"] for record in records) <= step  # nothing logged past last.pt


def test_a_lock_whose_process_is_gone_is_taken_over(run_copy, mnist_root, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = run_copy / ".lock"
    lock.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "started": "earlier"}))
    code, _, err = cli(capsys, "train", "--out", run_copy, "--resume", "--steps", "3", *on_fake_mnist(mnist_root),
                       "--no-progress")
    assert code == 0, err
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": "another-machine", "started": "earlier"}))
    code, _, err = cli(capsys, "train", "--out", run_copy, "--resume", *on_fake_mnist(mnist_root), "--no-progress")
    assert_refused(code, err, "another-machine", f"delete {lock}")  # another host: no way to tell, so refused


# -- import-pretrained, and the names the help text gives -----------------------------------
def test_import_pretrained_refuses_bad_folders_and_keeps_an_existing_out(tmp_path, capsys):
    from test_pretrained import TINY_DIFFUSERS_CONFIG

    existing = tmp_path / "model.pt"
    existing.write_bytes(b"an earlier import")
    source = tmp_path / "unet"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(TINY_DIFFUSERS_CONFIG))
    (source / "diffusion_pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/ddpm_pwned'\ntR.")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "import-pretrained", source, "--out", existing)
    assert_refused(code, err, str(existing), "--force", before=before)
    code, _, err = cli(capsys, "import-pretrained", source, "--out", tmp_path / "new.pt", "--force")
    assert_refused(code, err, "diffusion_pytorch_model.bin", "weights_only", before=before)
    (source / "config.json").write_text('{"block_out_channels": [32, 64],')
    code, _, err = cli(capsys, "import-pretrained", source, "--out", tmp_path / "new.pt")
    assert_refused(code, err, str(source / "config.json"), "not valid JSON")
    assert not Path("/tmp/ddpm_pwned").exists() and not (tmp_path / "new.pt").exists()


def test_the_help_names_the_inception_file_the_code_reads():
    from ddpm_core import cli as cli_module
    from ddpm_core.evaluation import INCEPTION_FILE

    assert cli_module.INCEPTION_FILE == INCEPTION_FILE == "weights-inception-2015-12-05-6726825d.pth"
