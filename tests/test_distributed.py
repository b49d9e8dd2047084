"""Training in several processes (torchrun, DistributedDataParallel) computes what one process
computes on the same global batch, and only rank 0 writes.

In process: each rank's share of the batches and of the batch's draws, that their gradients
average to the one-process gradient, and what each rank's checkpoint holds. The end-to-end
check (`slow`) runs the real command twice on the CPU, `torchrun --nproc_per_node 2 -m
ddpm_core train` (gloo) and a plain `python -m ddpm_core train`, on the smoke profile and a
fake MNIST in torchvision's format, then resumes both and compares again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import DiffusionConfig, TrainConfig, replace
from ddpm_core.denoisers import build_model
from ddpm_core.diffusion import loss_simple
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


def tiny_trainer(tmp_path, **train_changes) -> Trainer:
    train = TrainConfig(steps=4, batch_size=8, warmup_steps=1, **train_changes)
    return Trainer(replace(TINY_UNET, num_classes=10), DiffusionConfig("linear", 50), train, [], tmp_path)


def test_one_process_draws_what_it_drew_before(tmp_path):
    """The batch's draws (label dropout, t, eps) come from a generator that starts where the
    global RNG stood after the initial weights, the RNG one process drew them from before it had
    a generator, in the same order: so a single process trains exactly as it always has."""
    trainer = tiny_trainer(tmp_path, label_dropout=0.3)
    x0, y = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    drop, t, eps = trainer.draw(x0, y)
    torch.manual_seed(trainer.config.seed)
    build_model(trainer.model_config)
    assert torch.equal(drop, torch.rand(8) < 0.3)
    assert torch.equal(t, torch.randint(0, 50, (8,)))
    assert torch.equal(eps, torch.randn(x0.shape))
    assert trainer.draw(x0, None)[0] is None  # an unconditional batch draws no dropout


def test_each_rank_takes_its_rows_of_the_global_batch_and_their_update_is_the_global_one(tmp_path):
    """In process, the step two gloo processes take: rank r draws the rows r, r + 2, ... of the
    global batch's draws, and the mean of the two ranks' gradients (what DDP averages) is the
    one-process gradient on the global batch."""
    trainer = tiny_trainer(tmp_path)
    x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    start = trainer.state.generator.get_state()

    def gradient(x0_rows: torch.Tensor, place: Distributed) -> tuple[list[torch.Tensor], torch.Tensor]:
        trainer.place = place  # the rows a rank draws depend on its place only
        trainer.state.generator.set_state(start)
        _, t, eps = trainer.draw(x0_rows, None)
        trainer.model.zero_grad()
        loss_simple(trainer.model, trainer.schedule, x0_rows, t=t, noise=eps).backward()
        return [p.grad.clone() for p in trainer.model.parameters()], t

    whole, t_whole = gradient(x0, Distributed())
    ranks = [gradient(x0[rank::2], Distributed(rank, 2)) for rank in (0, 1)]
    for rank, (_, t_rank) in enumerate(ranks):
        assert torch.equal(t_rank, t_whole[rank::2])
    for g, g0, g1 in zip(whole, ranks[0][0], ranks[1][0]):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-4, atol=1e-6)


@dataclass(frozen=True)
class Gathering(Distributed):
    """A rank whose `gather` returns the given items: two processes' checkpoint, in one."""

    items: tuple = ()

    def gather(self, item: object) -> list:
        return list(self.items)


def test_each_rank_resumes_its_own_random_stream_and_the_shared_one(tmp_path):
    """last.pt of two processes holds each rank's global RNG and the generator they share;
    rank 1 resumes its own stream and the shared one."""
    trainer = tiny_trainer(tmp_path)
    gathered = [{"cpu": torch.Generator().manual_seed(100 + rank).get_state(), "cuda": None} for rank in (0, 1)]
    trainer.state.place = Gathering(0, 2, items=tuple(gathered))
    trainer.state.generator.manual_seed(7)
    shared = trainer.state.generator.get_state()
    trainer.state.save(tmp_path / "last.pt")
    saved = load_checkpoint(tmp_path / "last.pt").train_state
    assert saved["world_size"] == 2 and torch.equal(saved["shared_rng"], shared)
    assert all(torch.equal(saved["rank_rng"][r]["cpu"], gathered[r]["cpu"]) for r in (0, 1))
    assert torch.equal(saved["torch_rng"], gathered[0]["cpu"])  # rank 0's own, as ever

    rank1 = tiny_trainer(tmp_path)
    rank1.state.place = Distributed(1, 2)
    rank1.state.generator.manual_seed(8)
    rank1.load(tmp_path / "last.pt")
    assert torch.equal(torch.get_rng_state(), gathered[1]["cpu"])
    assert torch.equal(rank1.state.generator.get_state(), shared)


def test_every_rank_records_the_global_batchs_losses_in_its_order(tmp_path):
    """With t drawn by loss, each rank's history takes all ranks' (t, loss) in the global
    batch's order (rank r holds rows r, r + W, ...), so every rank draws the same next t."""
    trainer = tiny_trainer(tmp_path, timestep_sampling="loss")
    shares = ((torch.tensor([3, 3]), torch.tensor([1.0, 3.0])), (torch.tensor([3, 4]), torch.tensor([2.0, 4.0])))
    for rank in (0, 1):
        trainer.place = Gathering(rank, 2, items=shares)
        trainer.timesteps.seen.zero_()
        trainer.record_losses(*shares[rank])
        assert trainer.timesteps.seen[3] == 3 and trainer.timesteps.seen[4] == 1
        assert trainer.timesteps.losses[3, :3].tolist() == [1.0, 2.0, 3.0] and trainer.timesteps.losses[4, 0] == 4.0


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


@pytest.mark.slow  # four torchrun / python runs of the command line (minutes on 2 cores)
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
