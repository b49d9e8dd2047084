"""Several processes, one run: torchrun, its process group, and what the trainer asks of it.

This module owns the process group and the data split: it reads what torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK), picks the backend (NCCL on GPUs, gloo on CPUs), gives each rank its
device, offers the few collectives the trainer needs, and deals each rank its share of every
global batch (`epoch_batches`, the batch order of one process too). The model wrapping
(DistributedDataParallel) lives in `ddpm_core.training`. A process started without torchrun
is rank 0 of 1 and never touches a process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ddpm_core.runtime import resolve_device


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: rank `rank` of `world_size`, on the node's GPU `local_rank`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size} is not a valid position")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, draws sample grids and writes every file."""
        return self.rank == 0

    # -- the collectives the trainer uses (no-ops in a single process) ----------------------
    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all ranks (gloo has no AVG, so SUM / world size)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def gather(self, item: object) -> list:
        """Every rank's `item` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [item]
        items = [None] * self.world_size
        dist.all_gather_object(items, item)
        return items

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. a dataset download), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def from_environment() -> Distributed:
    """The rank torchrun gave this process, or rank 0 of 1 when it was started without torchrun."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them): {error}") from None
    return Distributed(rank, world_size, local_rank)


def setup(device: str = "auto") -> tuple[Distributed, torch.device]:
    """Join torchrun's process group, if there is one, and return this rank's place and device.

    Under torchrun a CUDA run puts rank r on GPU LOCAL_RANK with NCCL; a CPU run uses gloo.
    Without torchrun nothing is initialised and `device` resolves as usual.
    """
    place = from_environment()
    resolved = resolve_device(device)
    if not place.enabled:
        return place, resolved
    if resolved.type == "cuda":
        if place.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {place.local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                             f"visible: use torchrun --nproc_per_node <= the number of GPUs")
        resolved = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(resolved)
        backend = "nccl"
    elif resolved.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"torchrun training runs on CUDA (NCCL) or on CPUs (gloo), not on {resolved.type}; "
                         f"pass --device cuda or --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=place.rank, world_size=place.world_size)
    return place, resolved


def teardown() -> None:
    """Leave the process group (at the end of a torchrun run; nothing to do otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch; it must split evenly."""
    if batch_size % world_size:
        raise ValueError(f"the global batch of {batch_size} does not split evenly over {world_size} processes; "
                         f"choose a --batch-size that is a multiple of --nproc_per_node")
    return batch_size // world_size


def epoch_batches(num_items: int, batch_size: int, seed: int, start_step: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[list[int]]:
    """Index batches forever, rank `rank`'s share (batch_size / world_size) of each global batch.

    Epoch e is the permutation seeded by seed + e, dealt out by torch's DistributedSampler
    (rank r gets its items r, r + W, r + 2W, ...) and cut into full batches, so the W shares of
    step k together are the single-process batch k. Starting at `start_step` skips exactly the
    batches already trained on.
    """
    local_batch = local_batch_size(batch_size, world_size)
    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = len(sampler) // local_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {num_items} images, fewer than one batch of {batch_size}")
    epoch, position = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)  # the permutation seeded by seed + epoch
        order = list(sampler)
        for i in range(position, per_epoch):
            yield order[i * local_batch : (i + 1) * local_batch]
        epoch, position = epoch + 1, 0
