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
