"""Share a step's packs among data-parallel ranks so that attention cost (sum of length squared) is even."""

from __future__ import annotations

from collections.abc import Sequence

from vlm_train.data.batch import PackedBatch


def attention_cost(batch: PackedBatch) -> int:
    """Sum over the pack's samples of length squared: what varlen attention's time grows with."""
    lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    return int((lengths.long() ** 2).sum())


def balance(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Pack indices for each rank: the same number each, heaviest first to the least-loaded rank (LPT), then
    swaps between the heaviest rank and another while they lower its load.

    Deterministic (ties go to the lower index and the lower rank); each rank's indices stay in stream order.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if len(costs) % world_size:
        raise ValueError(
            f"{len(costs)} packs cannot be shared evenly among {world_size} ranks: "
            "make packs per step a multiple of the world size"
        )
    per_rank = len(costs) // world_size
    loads = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min((r for r in range(world_size) if len(shares[r]) < per_rank), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += costs[index]
    _improve(shares, loads, costs)
    return [sorted(share) for share in shares]


def _improve(shares: list[list[int]], loads: list[float], costs: Sequence[float], rounds: int = 64) -> None:
    """Swap a pack of the heaviest rank with one of another rank while that lowers the heaviest load."""
    for _ in range(rounds):
        top = max(range(len(loads)), key=lambda r: (loads[r], -r))
        best = None  # (new peak of the pair, other rank, position in top, position in other)
        for other in range(len(loads)):
            if other == top:
                continue
            for i, a in enumerate(shares[top]):
                for j, b in enumerate(shares[other]):
                    delta = costs[a] - costs[b]
                    if delta > 0 and loads[other] + delta < loads[top]:
                        peak = max(loads[top] - delta, loads[other] + delta)
                        if best is None or peak < best[0]:
                            best = (peak, other, i, j)
        if best is None:
            return
        _, other, i, j = best
        a, b = shares[top][i], shares[other][j]
        shares[top][i], shares[other][j] = b, a
        loads[top] += costs[b] - costs[a]
        loads[other] += costs[a] - costs[b]


def rank_share(packs: list[PackedBatch], world_size: int, rank: int) -> list[PackedBatch]:
    """The packs of one step that `rank` trains on, when every rank holds the same list of the step's packs."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world size {world_size}")
    return [packs[i] for i in balance([attention_cost(p) for p in packs], world_size)[rank]]
