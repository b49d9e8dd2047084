"""The GPU benchmark runs on the CPU too (small), so its code is never left untested, and what it
files as measured is timed, not derived."""

import importlib
import json
import math
import time
from pathlib import Path

import pytest
import torch

from ddpm_core.config import DiffusionConfig
from ddpm_core.schedule import NoiseSchedule

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` module
    return importlib.import_module("bench_train_gpu")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_benchmark_runs_small_on_the_cpu(bench, tmp_path, capsys):
    bench.main(["--device", "cpu", "--profile", "smoke", "--batch", "4", "--steps", "1", "--warmup", "1",
                "--configs", "fp32,bf16-cl", "--sample-batch", "2", "--sample-steps", "2", "--sample-repeats", "1",
                "--name", "small", "--results", str(tmp_path)])
    results = json.loads((tmp_path / "small.json").read_text())
    assert str(tmp_path / "small.json") in capsys.readouterr().out
    assert results["device"] == "cpu" and results["parameters"] > 0 and set(results["train"]) == {"fp32", "bf16-cl"}
    for speed in results["train"].values():
        assert all(positive(speed[key]) for key in ("images_per_s", "step_ms", "warmup_s"))
        assert positive(speed["projected"]["hours_for_800k_steps_at_128"]) and speed["projected"]["how"]
    assert set(results["sample"]) == {"fp32", "bf16-cl"}
    for speed in results["sample"].values():
        assert speed["amp"] is False  # bfloat16 autocast is CUDA's only; the file says what ran
        assert speed["batch"] == 2 and positive(speed["forward_ms"])
        assert speed["ddim"]["steps"] == 2 and all(positive(speed["ddim"][k]) for k in ("seconds", "images_per_s"))
        assert "ddpm" not in speed and positive(speed["projected"]["ddpm_images_per_s"])  # not measured: projected
        assert "--ddpm" in speed["projected"]["how"]


class SlowAwayFromForwardT(torch.nn.Module):
    """A denoiser that takes `delay` s at every timestep except the benchmark's FORWARD_T, so a
    sampling time carried over from the single forward would be far too small."""

    def __init__(self, forward_t: int, delay: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # `sample` finds the device through it
        self.forward_t, self.delay, self.calls = forward_t, delay, []

    def forward(self, x_t, t, y=None):
        self.calls.append(int(t[0]))
        if int(t[0]) != self.forward_t:
            time.sleep(self.delay)
        return torch.zeros_like(x_t)


def test_sampling_speed_is_timed_over_whole_sampling_runs(bench):
    delay, schedule = 0.02, NoiseSchedule.from_config(DiffusionConfig("linear", 25))
    model = SlowAwayFromForwardT(bench.FORWARD_T, delay)
    speed = bench.sample_speed(model, schedule, (2, 1, 8, 8), ddim_steps=3, repeats=1, amp=False,
                               device=torch.device("cpu"), ddpm=True)
    assert speed["ddim"]["steps"] == 3 and speed["ddpm"]["steps"] == 25
    assert speed["ddim"]["seconds"] >= 3 * delay and speed["ddpm"]["seconds"] >= 25 * delay  # the steps' real cost
    assert speed["forward_ms"] < 1000 * delay  # the forward alone never waited: it is not what was carried over
    assert speed["ddim"]["images_per_s"] == pytest.approx(2 / speed["ddim"]["seconds"])
    assert "projected" not in speed  # DDPM was measured, so nothing is projected
    sampled = [t for t in model.calls if t != bench.FORWARD_T]
    assert len(sampled) == 2 * (3 + 25)  # DDIM and DDPM each: one untimed run, then the timed one


def test_the_ema_sweep_carries_the_trainers_own_average_bit_for_bit(tmp_path, monkeypatch):
    from fake_data import write_fake_mnist

    from ddpm_core.checkpoint import load_checkpoint
    from ddpm_core.runs import resolve_run, run_dir, trained_checkpoint

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sweep = importlib.import_module("ema_sweep")
    write_fake_mnist(tmp_path / "data", n=48)
    spec = resolve_run("smoke", steps=6, sample_every=0, snapshot_every=0)
    folder = run_dir(spec, tmp_path / "runs")
    specs = sweep.track_specs([10.0, 3.0], [0.9], spec.train.ema_decay)
    last = trained_checkpoint(spec, tmp_path / "data", root=tmp_path / "runs",
                              extra_hooks=[sweep.EMATracks(specs, folder, spec)])
    tracks, own = torch.load(folder / sweep.TRACKS_FILE, weights_only=True), load_checkpoint(last).ema_state
    assert specs["ramp 10"] == (spec.train.ema_decay, spec.train.ema_warmup, spec.train.ema_ramp)
    assert all(torch.equal(tracks["ramp 10"][k], v) for k, v in own.items())  # from the same initial weights
    for other in ("ramp 3", "fixed 0.9"):
        assert not all(torch.equal(tracks[other][k], v) for k, v in own.items())


def test_train_profile_scores_the_ddim_rows_with_the_eta_and_spacing_asked(tmp_path, monkeypatch):
    """One tuning-table row end to end on smoke (fake MNIST): trained, judged, scored and written,
    the DDIM-50 rows with --eta and --spacing, the DDPM row with the paper's sampler."""
    from fake_data import write_fake_mnist

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    profile = importlib.import_module("train_profile")
    write_fake_mnist(tmp_path / "data", n=48)
    monkeypatch.setattr(profile, "RESULTS", tmp_path / "results")
    used = []
    real_score = profile.score

    def recording_score(checkpoint, sampler, *args, **kwargs):
        used.append(sampler)
        return real_score(checkpoint, sampler, *args, **kwargs)

    monkeypatch.setattr(profile, "score", recording_score)
    monkeypatch.setattr("sys.argv", [
        "train_profile.py", "--label", "smoke row", "--profile", "smoke", "--samples", "8", "--threads", "1",
        "--data-root", str(tmp_path / "data"), "--runs-root", str(tmp_path / "runs"), "--device", "cpu",
        "--set", "train.sample_every=0", "--set", "train.snapshot_every=0",
        "--eta", "0", "--spacing", "quadratic", "--raw", "--ddpm", "--sampling-seeds", "2", "3"])
    profile.main()
    result = json.loads((tmp_path / "results" / "train_profile" / "smoke_row.json").read_text())
    assert (result["ddim_eta"], result["ddim_spacing"], result["sampling_seeds"]) == (0.0, "quadratic", [2, 3])
    assert [(s.sampler, s.num_steps, s.eta, s.spacing) for s in used] == [
        ("ddim", 50, 0.0, "quadratic")] * 2 + [("ddpm", None, 0.0, "uniform")] * 2 + [("ddim", 50, 0.0, "quadratic")] * 2
    assert used[2].variance == "fixedlarge"
    for key in ("ddim50", "ddpm1000", "ddim50_raw"):
        row = result[key]
        assert [draw["sampling_seed"] for draw in row["draws"]] == [2, 3]
        for draw in row["draws"]:
            assert math.isfinite(draw["fid"]) and sum(draw["class_counts"]) <= 8 and 0 <= draw["confident_fraction"] <= 1
        assert row["draws"][0]["fid"] != row["draws"][1]["fid"]  # other noise, other samples
        assert row["fid"] == pytest.approx(sum(d["fid"] for d in row["draws"]) / 2, abs=0.006)
        assert row["confident_fraction"] == pytest.approx(sum(d["confident_fraction"] for d in row["draws"]) / 2)
        assert row["smallest_class_share"] == min(d["smallest_class_share"] for d in row["draws"])
        assert (tmp_path / "results" / "train_profile" / f"smoke_row_{key}.png").is_file()
    assert result["steps"] == 20 and result["gflop_per_image"] > 0 and result["training_seconds"] > 0


def test_the_ema_sweep_refuses_a_folder_it_cannot_score(tmp_path, monkeypatch):
    """A training cut short saved no averages, and other averages are not these: both say what to do."""
    from ddpm_core.runs import resolve_run, run_dir

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sweep = importlib.import_module("ema_sweep")
    out = run_dir(resolve_run("smoke"), tmp_path / "ema_sweep")
    out.mkdir(parents=True)
    (out / "last.pt").write_bytes(b"")
    monkeypatch.setattr("sys.argv", ["ema_sweep.py", "--profile", "smoke", "--runs-root", str(tmp_path),
                                     "--ramps", "3", "--fixed", "--threads", "1", "--device", "cpu"])
    with pytest.raises(SystemExit, match="stopped before its end saves none.*remove the folder"):
        sweep.main()
    torch.save({"ramp 5": {}}, out / sweep.TRACKS_FILE)
    with pytest.raises(SystemExit, match=r"trained with the averages \['ramp 5'\], not \['ramp 3'\]"):
        sweep.main()
