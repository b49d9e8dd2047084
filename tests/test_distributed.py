"""Training in several processes (torchrun, DistributedDataParallel) computes what one process
computes on the same global batch, and only rank 0 writes.

The end-to-end check runs the real command twice on the CPU, `torchrun --nproc_per_node 2 -m
ddpm_core train` (gloo) and a plain `python -m ddpm_core train`, on the smoke profile and a
fake MNIST in torchvision's format, then resumes both and compares again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.distributed import Distributed, from_environment
from ddpm_core.profiles import get_profile
from ddpm_core.training import Trainer, epoch_batches, read_log
from fake_data import write_fake_mnist


def take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_ranks_shares_are_the_single_process_batch(world_size):
    num_items, batch, seed, steps = 50, 8, 3, 14  # 6 batches an epoch: the shares cross epochs
    single = take(epoch_batches(num_items, batch, seed, 0), steps)
    shares = [take(epoch_batches(num_items, batch, seed, 0, rank, world_size), steps) for rank in range(world_size)]
    for k in range(steps):
        assert all(len(share[k]) == batch // world_size for share in shares)
        # rank r holds the items r, r + W, ... of the global batch (DistributedSampler's order)
        interleaved = [shares[i % world_size][k][i // world_size] for i in range(batch)]
        assert interleaved == single[k]


def test_one_process_gets_each_epochs_seeded_permutation():
    """The closed form of the batch order, which torchrun must not have changed: epoch e is
    randperm(N) seeded with seed + e, cut into full batches (the remainder is dropped)."""
    num_items, batch, seed = 21, 5, 7
    expected = []
    for epoch in range(3):
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        expected += [order[i * batch:(i + 1) * batch] for i in range(num_items // batch)]
    assert take(epoch_batches(num_items, batch, seed, 0), len(expected)) == expected


@pytest.mark.parametrize("rank", [0, 1])
def test_resuming_skips_exactly_the_batches_trained_on(rank):
    fresh = take(epoch_batches(40, 8, 0, 0, rank, 2), 12)
    assert take(epoch_batches(40, 8, 0, 7, rank, 2), 5) == fresh[7:]


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="multiple of --nproc_per_node"):
        next(epoch_batches(40, 8, 0, 0, rank=0, world_size=3))
    profile = get_profile("smoke")
    with pytest.raises(ValueError, match="does not split evenly over 3 processes.*multiple of --nproc_per_node"):
        Trainer(profile.model, profile.diffusion, profile.train, [], "unused", place=Distributed(0, 3))


def test_place_comes_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() == Distributed(0, 1, 0) and not from_environment().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    place = from_environment()
    assert place == Distributed(3, 4, 1) and place.enabled and not place.is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 of world size 4"):
        from_environment()


def test_one_process_draws_what_it_drew_before():
    """t and eps for the batch come from the global RNG in loss_simple's order, so a single
    process trains exactly as before the draws moved into the trainer."""
    profile = get_profile("smoke")
    trainer = Trainer(profile.model, profile.diffusion, profile.train, [], "unused")
    x0 = torch.zeros(profile.train.batch_size, 1, 28, 28)
    torch.manual_seed(11)
    drop, t, eps = trainer.draw(x0, None)
    torch.manual_seed(11)
    assert drop is None
    torch.testing.assert_close(t, torch.randint(0, profile.diffusion.num_timesteps, (len(x0),)), rtol=0, atol=0)
    torch.testing.assert_close(eps, torch.randn(x0.shape), rtol=0, atol=0)


# -- the real command, 2 gloo processes against 1 -----------------------------------------------
def train(out: Path, data: Path, steps: int, processes: int, resume: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [
        "-m", "ddpm_core", "train", "--profile", "smoke", "--out", str(out), "--data-root", str(data),
        "--device", "cpu", "--steps", str(steps), "--no-progress"] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def files_in(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def reports(stdout: str) -> list[dict]:
    """The JSON reports printed (one per process that printed one)."""
    decoder, found, text = json.JSONDecoder(), [], stdout
    while "{" in text:
        report, end = decoder.raw_decode(text[text.index("{"):])
        found.append(report)
        text = text[text.index("{") + end:]
    return found


def assert_same_run(two: Path, one: Path) -> None:
    a, b = load_checkpoint(two / "last.pt"), load_checkpoint(one / "last.pt")
    assert a.train_state["step"] == b.train_state["step"]
    assert (a.train_state["world_size"], b.train_state["world_size"]) == (2, 1)
    # Float tolerance: averaging two half-batch gradients sums in another order than one
    # backward pass over the batch (~1e-7), and Adam's first steps, g / sqrt(v), turn that into
    # up to ~lr for the rare weight whose gradient is ~0. Wrong shares or shared noise would
    # move most weights by ~lr (1e-3 on smoke).
    for state_a, state_b in ((a.model_state, b.model_state), (a.ema_state, b.ema_state)):
        for name in state_b:
            torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-4, atol=2e-4, msg=name)
    log_a, log_b = read_log(two / "log.jsonl"), read_log(one / "log.jsonl")
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]  # rank 1 wrote no lines of its own
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "heldout_loss"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4), (key, ra["step"])
    assert files_in(two) == files_in(one)  # the same files: samples, snapshots, best.pt, loss.png


def test_two_gloo_processes_train_as_one_on_the_global_batch(tmp_path):
    data = tmp_path / "data"
    write_fake_mnist(data)
    two, one = tmp_path / "two", tmp_path / "one"
    for out, processes in ((two, 2), (one, 1)):
        done = train(out, data, steps=6, processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        printed = reports(done.stdout)
        assert len(printed) == 1 and printed[0]["processes"] == processes  # rank 0 reports, once
    assert_same_run(two, one)

    # --resume at the same world size continues both to the same weights
    for out, processes in ((two, 2), (one, 1)):
        done = train(out, data, steps=12, processes=processes, resume=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(two, one)
    assert {"samples/step_0000010.png", "snapshots/step_0000010.pt"} <= files_in(two)

    # ... and at another world size it is refused, saying how to resume
    refused = train(two, data, steps=14, processes=1, resume=True)
    assert refused.returncode == 2
    assert "trained by 2 process(es)" in refused.stderr and "--nproc_per_node 2" in refused.stderr
