"""Data-parallel profiling on `torch.distributed`: each rank profiles a shard, the sums are all-reduced.

`partinfer profile` runs unchanged under `torchrun --nproc-per-node N` (one machine or several):
torchrun sets RANK and WORLD_SIZE, `process_group` joins the group (gloo on CPU, NCCL on CUDA),
every rank profiles a disjoint, deterministic shard of each data set (balanced by tokens), and the
statistics — sums and counts, which add exactly — are all-reduced, so every rank holds the totals
and rank 0 alone writes the files. A rank that fails does not leave the others waiting in a
collective until gloo drops them with a traceback: each step of a rank's own work runs under
`together`, which lets every rank learn whether any failed, and how, before the next collective, so
every rank stops with one line naming the failed rank's error. Files are written only after the last
all-reduce, so a failed run writes nothing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from partinfer.common.errors import PartinferError
from partinfer.profiler.stats import ActivationStats


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world` (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()
T = TypeVar("T")


@contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """Join the torchrun group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield SINGLE
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as e:
        raise PartinferError(f"could not join the torchrun process group ({backend}): {e}") from e
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def together(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run this rank's `work`, then agree with every other rank on whether all succeeded. The failed
    rank re-raises its own error (a traceback when it is a bug); the others raise a one-line
    PartinferError naming the first failed rank and its error, instead of waiting for it in the next
    collective."""
    result, error = None, None
    try:
        result = work()
    except Exception as e:
        if not ranks.distributed:
            raise
        error = e
    if not ranks.distributed:
        return result
    mine = None if error is None else str(error) if isinstance(error, PartinferError) else f"{type(error).__name__}: {error}"
    failures: list[str | None] = [None] * ranks.world
    dist.all_gather_object(failures, mine)
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise PartinferError(f"rank {rank} of {ranks.world} failed, so this rank stops too: {failure}")
    return result


def shard_by_tokens(lengths: list[int], ranks: Ranks) -> list[int]:
    """Indices of the prompts this rank profiles: longest first, each to the rank with the fewest tokens
    so far (ties to the lower rank), returned in their original order. Deterministic, disjoint, and
    together they cover every prompt."""
    totals = [0] * ranks.world
    mine = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(ranks.world), key=lambda r: (totals[r], r))
        totals[r] += lengths[i]
        if r == ranks.rank:
            mine.append(i)
    return sorted(mine)


def all_reduce_stats(stats: ActivationStats, ranks: Ranks) -> ActivationStats:
    """Sum every rank's statistics into every rank's `stats` (in place): float64 sums and counts add exactly
    up to the order of the additions."""
    if not ranks.distributed:
        return stats
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    packed = torch.cat([torch.stack(stats.sum_abs), torch.stack(stats.core_count)]).to(device)  # [2L, n] float64
    tokens = torch.tensor([stats.tokens], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    dist.all_reduce(tokens)
    L = len(stats.sum_abs)
    packed = packed.cpu()
    stats.sum_abs = list(packed[:L].unbind())
    stats.core_count = list(packed[L:].unbind())
    stats.tokens = int(tokens.item())
    return stats
