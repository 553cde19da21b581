"""Which shards each reader slot (one loader worker of one rank) reads in an epoch.

The units of an epoch (shards, or slices of shards when there are fewer shards than slots) are permuted from the
seed and the epoch, then dealt out by stride: slot s of S takes units s, s+S, s+2S, ... of the permutation. Every
unit goes to exactly one slot, slots differ by at most one unit, and no slot needs to know what the others read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from vlm_train.data.state import new_rng


@dataclass(frozen=True)
class Unit:
    """One shard, or one slice of it: the samples whose index in the shard is `part` modulo `parts`."""

    shard: int  # index into the source's list of shard URLs
    part: int = 0
    parts: int = 1

    def holds(self, index: int) -> bool:
        return index % self.parts == self.part


def parts_per_shard(num_shards: int, slots: int) -> int:
    """Slices per shard: 1 when there are enough shards, else enough slices for every slot to get one."""
    return max(1, -(-slots // num_shards))


@functools.lru_cache(maxsize=16)
def epoch_order(num_units: int, seed: int, source: str, epoch: int) -> np.ndarray:
    """The permutation of an epoch's units, the same in every process (cached: every slot asks for it)."""
    order = new_rng(seed, "shards", source, epoch).permutation(num_units)
    order.flags.writeable = False
    return order


def slot_units(num_shards: int, slot: int, slots: int, seed: int, source: str, epoch: int) -> list[Unit]:
    """The units slot `slot` of `slots` reads in `epoch`, in reading order."""
    if num_shards <= 0:
        raise ValueError(f"data source {source!r} has no shards")
    if not 0 <= slot < slots:
        raise ValueError(f"reader slot {slot} outside 0..{slots - 1}")
    parts = parts_per_shard(num_shards, slots)
    order = epoch_order(num_shards * parts, seed, source, epoch)
    return [Unit(int(u) // parts, int(u) % parts, parts) for u in order[slot::slots]]


def reader_slot(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """(slot, slots) of one loader worker of one rank; ranks of every node count, so nodes never overlap."""
    workers = max(num_workers, 1)
    if not 0 <= rank < world_size or not 0 <= worker < workers:
        raise ValueError(f"rank {rank} of {world_size} / worker {worker} of {workers} out of range")
    return rank * workers + worker, world_size * workers
