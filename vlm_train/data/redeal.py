"""Re-deal the data position of a run to another number of ranks or loader workers.

Why: each epoch, a source's units (shards, or slices of shards) are permuted and dealt to the reader slots by stride
(shard_assignment.slot_units), so one rank's loader state only means something for the number of slots it was saved
with. The position in the data is global though: which units of each epoch in flight are read, which one each slot is
part-way through, and which samples sit in buffers, read but not trained. `merge_loader_states` undoes the deal into
that position (a DataPosition); `deal_loader_state` deals it out again to a new number of slots, so that every sample
of the epochs in flight is trained exactly once across the change:

- units fully read are done; a unit part-read goes on from its cursor on exactly one new slot; units not read yet are
  dealt to the new slots. The new slots get these as explicit lists, one per epoch in flight (`dealt` in the state of
  sources.SourceReader); the epochs after them use the normal deal for the new slot count.
- every sample read but not handed out in a pack (reader shuffle buffers, packer buffers, pending packs) goes to
  exactly one new slot, which reads it again by its restore key. Samples handed out in packs are trained: they stay so.

Only exactly-once is kept across a resize, not the order a run of the new size would have had: the new slots' shuffle
and mixture generators are derived from the seed, the slot and the number of packs handed out so far. With the same
number of slots (the same world size and workers, or e.g. 2 ranks x 2 workers -> 4 ranks x 1), every slot keeps its
state as it is, and the resume stays exact.

Pure functions of JSON-able states: nothing is read from the shards here (the new slots read their buffered samples
again when their loader loads the state).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlm_train.data.loader import LOADER_STATE_VERSION
from vlm_train.data.shard_assignment import slot_units
from vlm_train.data.state import new_rng, rng_state
from vlm_train.data.stream import STATE_VERSION

__all__ = ["DataPosition", "deal_loader_state", "merge_loader_states", "redeal_loader_states"]

Entry = list[Any]  # a unit to read: [shard, part, parts, index, offset]; index/offset: where its reading begins
Key = dict[str, Any]  # a restore key (state.py)
REDEAL = "redeal"  # in the names of the generators a re-deal derives


@dataclass
class DataPosition:
    """Where a run is in its data, whatever the number of slots it is dealt to."""

    seed: int
    weights: dict[str, float]  # the mixture, source name -> weight, in the sources' order
    shards: dict[str, int]  # per source: its number of shard URLs, which the deal of an epoch depends on
    first_epoch: dict[str, int]  # per source: the earliest epoch still in flight on some slot
    units: dict[str, list[list[Entry]]]  # per source: the units left of each epoch from first_epoch on, part-read first
    reader_keys: dict[str, list[Key]]  # per source: the samples in the readers' shuffle buffers
    packer_keys: list[Key]  # the samples in the packers' buffers
    pending: list[list[Key]]  # packs formed but not handed out, as their samples' keys
    skipped: dict[str, int]  # skip counts ("source/reason"), summed over slots
    packer_counts: dict[str, int]  # the packers' drop and truncation counts, summed
    seen: tuple[int, int]  # (tokens, patches) every packer has seen, summed: the average ViT load per token
    packs: int  # packs handed out, summed over slots


def redeal_loader_states(
    states: list[dict[str, Any]],
    world_size: int,
    workers: int,
    rank: int,
    shards: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The loader state of `rank` of `world_size` ranks with `workers` loader workers each (data.num_workers; 0 counts
    as 1), from the saved states of every rank of the old run (PackedLoader.state_dict(), in any order).

    The same layout gives back that rank's state unchanged; the same number of slots regroups the slots' states
    unchanged; any other layout is merged and dealt again (exactly once per sample of the epochs in flight, see the
    module). `shards`: each source's number of shard URLs (len(Source.urls)), which the deal of an epoch depends on;
    None: those the states hold (every state saved since re-dealing exists does; only a merge needs them).
    """
    ordered = _ordered(states)
    if shards is not None:
        shards = _shard_counts(ordered, shards)
    workers = _check_layout(world_size, workers, rank)
    old = (ordered[0]["world_size"], ordered[0]["workers"])
    if (world_size, workers) == old:
        return copy.deepcopy(ordered[rank])
    if world_size * workers == old[0] * old[1]:
        return _regroup(ordered, shards or ordered[0].get("shards"), world_size, workers, rank)
    return deal_loader_state(merge_loader_states(ordered, shards), world_size, workers, rank)


def redeal_all_loader_states(
    states: list[dict[str, Any]], world_size: int, workers: int, shards: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """The loader states of every rank of `world_size` (see redeal_loader_states), merging the saved ones once: what
    one process computes and hands out to the others."""
    ordered = _ordered(states)
    old = (ordered[0]["world_size"], ordered[0]["workers"])
    slots = world_size * max(workers, 1)
    if (world_size, max(workers, 1)) == old or slots == old[0] * old[1]:  # no merge: kept or regrouped per rank
        return [redeal_loader_states(ordered, world_size, workers, rank, shards) for rank in range(world_size)]
    position = merge_loader_states(ordered, shards)
    return [deal_loader_state(position, world_size, workers, rank) for rank in range(world_size)]


def merge_loader_states(states: list[dict[str, Any]], shards: Mapping[str, int] | None = None) -> DataPosition:
    """The global data position held by the loader states of every rank of a run (see redeal_loader_states)."""
    ordered = _ordered(states)
    names = list(ordered[0]["weights"])
    shards = _shard_counts(ordered, shards)
    seed = int(ordered[0]["seed"])
    slot_states = [worker for state in ordered for worker in state["worker_states"]]
    slots = len(slot_states)
    live = [s for s in slot_states if s is not None]  # None: a worker that has handed out no pack yet
    first_epoch, units, reader_keys = {}, {}, {}
    for name in names:
        readers = [s["readers"][name] if s is not None else None for s in slot_states]
        first_epoch[name], units[name] = _units_left(name, int(shards[name]), readers, slots, seed)
        reader_keys[name] = [key for r in readers if r is not None for key in r["buffer"]]
    skipped: Counter = Counter()
    packer_counts: Counter = Counter()
    for s in live:
        skipped.update(s["skipped"])
        packer_counts.update(s["packer"].get("counts", {}))
    return DataPosition(
        seed=seed,
        weights={name: float(w) for name, w in ordered[0]["weights"].items()},
        shards=shards,
        first_epoch=first_epoch,
        units=units,
        reader_keys=reader_keys,
        packer_keys=[key for s in live for key in s["packer"]["buffer"]],
        pending=[pack for s in live for pack in s["pending"]],
        skipped=dict(skipped),
        packer_counts=dict(packer_counts),
        seen=(sum(int(s["packer"]["seen_tokens"]) for s in live), sum(int(s["packer"]["seen_patches"]) for s in live)),
        packs=sum(int(s["packs"]) for s in live),
    )


def deal_loader_state(position: DataPosition, world_size: int, workers: int, rank: int) -> dict[str, Any]:
    """The loader state of `rank` of `world_size` ranks x `workers` workers: its slots' shares of `position`.

    Slot t of T takes the t-th of every T units left (part-read ones first, so they spread over the slots), and of
    every T buffered samples and pending packs. The skip and drop counts go to slot 0 whole, and the pack and seen
    totals are split, so their sums over the new ranks are the old ones.
    """
    workers = _check_layout(world_size, workers, rank)
    slots = world_size * workers
    return {
        "version": LOADER_STATE_VERSION,
        "seed": position.seed,
        "rank": rank,
        "world_size": world_size,
        "workers": workers,
        "next_worker": 0,
        "weights": dict(position.weights),
        "shards": dict(position.shards),
        "worker_states": [_slot_state(position, slot, slots) for slot in range(rank * workers, (rank + 1) * workers)],
    }


# ---- merging ---------------------------------------------------------------------------------------------------


def _units_left(
    name: str, num_shards: int, readers: list[dict[str, Any] | None], slots: int, seed: int
) -> tuple[int, list[list[Entry]]]:
    """(first epoch in flight, the units left of each epoch from it to the last in flight). A slot past an epoch read
    all its units of it; a slot in it has its current unit part-read at its cursor and the ones after left; a slot
    before it has all its units of it left (slots run ahead of each other: a finished share goes on to the next epoch).
    The last epoch in flight is the latest any slot is in, or has explicit units of from an earlier re-deal (which
    deals every slot the same epochs).
    """
    at = [int(r["epoch"]) if r is not None else 0 for r in readers]
    last = max(a + len(r.get("dealt", [])) - 1 if r is not None else a for a, r in zip(at, readers))
    first = min(at)
    left = []
    for epoch in range(first, max(max(at), last) + 1):
        part_read: list[Entry] = []
        rest: list[Entry] = []
        for slot, reader in enumerate(readers):
            if at[slot] > epoch:
                continue
            units = _slot_units(name, num_shards, reader, slot, slots, seed, epoch)
            if at[slot] < epoch:
                rest.extend(units)
                continue
            unit = int(reader["unit"]) if reader is not None else 0
            if unit > len(units):
                raise ValueError(
                    f"loader state of source {name!r}, reader slot {slot} of {slots}: unit {unit} of epoch {epoch} but "
                    f"the deal of {num_shards} shard(s) gives it {len(units)}: pass the shard counts of the run that "
                    "saved the states"
                )
            if unit < len(units):
                cursor = [int(reader["index"]), reader["offset"]] if reader is not None else units[unit][3:]
                part_read.append(units[unit][:3] + cursor)
            rest.extend(units[unit + 1 :])
        left.append(part_read + rest)
    return first, left


def _slot_units(
    name: str, num_shards: int, reader: dict[str, Any] | None, slot: int, slots: int, seed: int, epoch: int
) -> list[Entry]:
    """The units one old slot reads in `epoch`: its explicit ones from an earlier re-deal, else the normal deal."""
    if reader is not None:
        dealt = reader.get("dealt", [])
        if 0 <= epoch - int(reader["epoch"]) < len(dealt):
            return [list(unit) for unit in dealt[epoch - int(reader["epoch"])]]
    return [[u.shard, u.part, u.parts, 0, None] for u in slot_units(num_shards, slot, slots, seed, name, epoch)]


# ---- dealing ---------------------------------------------------------------------------------------------------


def _slot_state(position: DataPosition, slot: int, slots: int) -> dict[str, Any]:
    """One new slot's SlotStream state (its keys in the order SlotStream.state_dict() writes them)."""
    seed, packs = position.seed, position.packs
    readers = {}
    for name in position.weights:
        first = position.first_epoch[name]
        dealt = [[list(unit) for unit in units[slot::slots]] for units in position.units[name]]
        index, offset = dealt[0][0][3:] if dealt[0] else (0, None)
        readers[name] = {
            "epoch": first,
            "unit": 0,
            "index": int(index),
            "offset": offset,
            "read_in_epoch": 0,
            "rng": rng_state(new_rng(seed, "shuffle", name, slot, first, REDEAL, packs)),
            "buffer": _copy(position.reader_keys[name][slot::slots]),
            "dealt": dealt,
        }
    tokens, patches = position.seen
    return {
        "version": STATE_VERSION,
        "slot": slot,
        "slots": slots,
        "readers": readers,
        "mixture": rng_state(new_rng(seed, "mixture", slot, REDEAL, packs)),
        "weights": list(position.weights.values()),
        "packer": {
            "buffer": _copy(position.packer_keys[slot::slots]),
            "seen_tokens": _share(tokens, slot, slots),
            "seen_patches": _share(patches, slot, slots),
            "counts": dict(position.packer_counts) if slot == 0 else {},
        },
        "pending": [_copy(pack) for pack in position.pending[slot::slots]],
        "failures": 0,
        "skipped": dict(position.skipped) if slot == 0 else {},
        "packs": _share(packs, slot, slots),
    }


def _regroup(
    ordered: list[dict[str, Any]], shards: Mapping[str, int] | None, world_size: int, workers: int, rank: int
) -> dict[str, Any]:
    """Same number of slots, other ranks x workers: slot s is slot s still, so its state carries over as it is."""
    slot_states = [worker for state in ordered for worker in state["worker_states"]]
    return {
        **{k: ordered[0][k] for k in ("version", "seed")},
        "rank": rank,
        "world_size": world_size,
        "workers": workers,
        "next_worker": 0,
        "weights": dict(ordered[0]["weights"]),
        **({"shards": dict(shards)} if shards is not None else {}),
        "worker_states": copy.deepcopy(slot_states[rank * workers : (rank + 1) * workers]),
    }


def _share(total: int, slot: int, slots: int) -> int:
    return total // slots + (1 if slot < total % slots else 0)


def _copy(keys: list[Key]) -> list[Key]:
    return [dict(key) for key in keys]


# ---- checks ----------------------------------------------------------------------------------------------------


def _ordered(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The states by rank, once checked to be every rank of one run at one point."""
    if not states:
        raise ValueError("no loader states to re-deal: pass the saved state of every rank of the old run")
    for state in states:
        if state.get("version") != LOADER_STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {LOADER_STATE_VERSION}")
    for field, what in (("seed", "seed"), ("world_size", "world size"), ("workers", "loader workers per rank")):
        values = {state[field] for state in states}
        if len(values) > 1:
            by_rank = ", ".join(f"rank {s['rank']}: {s[field]}" for s in states[:8])
            raise ValueError(
                f"loader states disagree on the {what} ({by_rank}{', ...' if len(states) > 8 else ''}): "
                "re-deal the states of one checkpoint of one run"
            )
    ordered = sorted(states, key=lambda s: s["rank"])
    world_size, workers = ordered[0]["world_size"], ordered[0]["workers"]
    ranks = [s["rank"] for s in ordered]
    if ranks != list(range(world_size)):
        raise ValueError(
            f"the loader states are of ranks {_brief(ranks)}, not each of ranks 0..{world_size - 1} once (the saved "
            f"world size): pass the state of every rank"
        )
    names = list(ordered[0]["weights"])
    for state in ordered:
        if sorted(state["weights"]) != sorted(names):
            raise ValueError(
                f"loader states of one run disagree on the sources: rank {state['rank']} has {sorted(state['weights'])}"
                f", rank 0 has {sorted(names)}"
            )
        if state["weights"] != ordered[0]["weights"]:
            raise ValueError(
                f"loader states disagree on the mixture: rank {state['rank']} has {state['weights']}, rank 0 has "
                f"{ordered[0]['weights']}: re-deal the states of one checkpoint"
            )
        if len(state["worker_states"]) != workers:
            raise ValueError(
                f"loader state of rank {state['rank']} holds {len(state['worker_states'])} worker states, "
                f"not its {workers} workers"
            )
        for worker, slot_state in enumerate(state["worker_states"]):
            if slot_state is not None:
                _check_slot(slot_state, state["rank"] * workers + worker, world_size * workers, names)
    return ordered


def _check_slot(state: dict[str, Any], slot: int, slots: int, names: list[str]) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"loader state of reader slot {slot}: version {state.get('version')} is not {STATE_VERSION}")
    if (state["slot"], state["slots"]) != (slot, slots):
        raise ValueError(
            f"loader state in the place of reader slot {slot} of {slots} is that of slot {state['slot']} of "
            f"{state['slots']}"
        )
    if sorted(state["readers"]) != sorted(names):
        raise ValueError(
            f"loader state of reader slot {slot} reads sources {sorted(state['readers'])}, its rank's mixture names "
            f"{sorted(names)}"
        )


def _shard_counts(ordered: list[dict[str, Any]], shards: Mapping[str, int] | None) -> dict[str, int]:
    """The sources' shard counts the states were saved with: `shards`, else the states' own, checked to agree."""
    names = list(ordered[0]["weights"])
    if shards is None:
        unknown = [s["rank"] for s in ordered if "shards" not in s]
        if unknown:
            raise ValueError(
                f"the loader states of ranks {_brief(unknown)} hold no shard counts (saved before re-dealing existed): "
                "pass shards={source name: len(Source.urls)} of the run that saved them"
            )
        shards = ordered[0]["shards"]
    for state in ordered:
        if "shards" in state and dict(state["shards"]) != dict(shards):
            raise ValueError(
                f"the loader state of rank {state['rank']} was saved with shard counts {state['shards']}, not "
                f"{dict(shards)}: a source's shard list changed since the save; re-deal with the shards it was saved "
                "with, and resume with those"
            )
    _check_shards(shards, names)
    return dict(shards)


def _check_shards(shards: Mapping[str, int], names: list[str]) -> None:
    if sorted(shards) != sorted(names):
        raise ValueError(
            f"shard counts are given for sources {sorted(shards)} but the loader states are of sources {sorted(names)}"
            ": pass each source's number of shard URLs (len(Source.urls)) of the run, which must keep the saved sources"
        )
    bad = {name: count for name, count in shards.items() if not (isinstance(count, int) and count > 0)}
    if bad:
        raise ValueError(f"shard counts must be positive integers, got {bad}")


def _check_layout(world_size: int, workers: int, rank: int) -> int:
    """The worker slots per rank (data.num_workers, 0 counting as 1), once the new layout is checked."""
    if world_size < 1 or workers < 0:
        raise ValueError(f"cannot re-deal to world_size={world_size} with {workers} loader workers per rank")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return max(workers, 1)


def _brief(values: list[int]) -> str:
    return str(values) if len(values) <= 12 else f"{values[:6]} ... {values[-3:]} ({len(values)})"
