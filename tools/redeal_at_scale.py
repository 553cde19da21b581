"""Re-deal at scale: the loader states of a large run, merged and dealt to another world size, timed and checked.

Builds the loader states of --ranks x --workers reader slots for --sources sources over --shards shards in all,
without reading a shard: the states are made directly in their format (vlm_train/data/loader.py, stream.py,
sources.py). Each slot is part-way through its units of epoch 0 (every --ahead-every-th already in epoch 1; a few
done with their units, their buffers draining), with a cursor, shuffle buffers of restore keys, a packer buffer and
pending packs. They are written as JSON (as a checkpoint writes them), read back, merged and dealt to --new-ranks x
--new-workers (vlm_train/data/redeal.py). Prints JSON: the states' bytes before and after, the seconds of each part,
and whether every unit left and every buffered sample of the epochs in flight is in the new states exactly once.
The new states are then re-dealt back to the old layout, which reads the explicit units a re-deal leaves (the path
of a run resized twice), and checked the same way. The check reads each state as its reader will (its own units and
cursor, or its explicit units after a re-deal), independently of how redeal.py merges them, and counts samples with
--samples-per-shard samples in each shard. At the defaults it needs ~3 GB of memory and ~40 s on a 2-core machine.

    python tools/redeal_at_scale.py
    python tools/redeal_at_scale.py --ranks 16 --workers 2 --new-ranks 12 --shards 1000
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from vlm_train.data.loader import LOADER_STATE_VERSION
from vlm_train.data.redeal import deal_loader_state, merge_loader_states
from vlm_train.data.shard_assignment import Unit, slot_units
from vlm_train.data.state import new_rng, rng_state
from vlm_train.data.stream import STATE_VERSION
from vlm_train.jsonio import dumps

OFFSET = 4096  # bytes per sample in the made-up shards: sample i starts at byte i * OFFSET


def _url(source: str, shard: int) -> str:
    return f"s3://bucket/{source}/shard-{shard:06d}.tar"


def _key(source: str, epoch: int, shard: int, index: int) -> dict[str, Any]:
    return {
        "source": source,
        "epoch": epoch,
        "url": _url(source, shard),
        "index": index,
        "offset": index * OFFSET,
        "key": f"{shard:06d}-{index:06d}",
    }


class Layout:
    """The made-up run: its sources, their shard counts, and the samples per shard."""

    def __init__(self, args: argparse.Namespace):
        self.seed = args.seed
        self.names = [f"source{i}" for i in range(args.sources)]
        self.shards = {
            n: args.shards // args.sources + (i < args.shards % args.sources) for i, n in enumerate(self.names)
        }
        self.samples = args.samples_per_shard
        self.args = args


# ---- building the old states -------------------------------------------------------------------------------------


def _read_backwards(
    layout: Layout, name: str, epoch: int, units: list[Unit], unit: int, index: int
) -> Iterator[tuple[int, int]]:
    """The samples a reader has read of its epoch so far, newest first, as (shard, index)."""
    for u in range(min(unit, len(units) - 1), -1, -1):
        end = index if u == unit else layout.samples
        for i in range(end - 1, -1, -1):
            if units[u].holds(i):
                yield units[u].shard, i


def _slot_state(layout: Layout, slot: int, slots: int) -> dict[str, Any]:
    args, seed = layout.args, layout.seed
    rng = new_rng(seed, "made-up state", slot)
    epoch = 1 if slot % args.ahead_every == 1 else 0
    readers, read = {}, {}
    for name in layout.names:
        units = slot_units(layout.shards[name], slot, slots, seed, name, epoch)
        done = rng.random() < 0.02  # its units all read, its buffer draining
        unit = len(units) if done else int(rng.integers(len(units)))
        index = 0 if done else int(rng.integers(1, layout.samples))
        read[name] = _read_backwards(layout, name, epoch, units, unit, index)
        buffer = [_key(name, epoch, s, i) for s, i in _take(read[name], args.buffer)]
        readers[name] = {
            "epoch": epoch,
            "unit": unit,
            "index": index,
            "offset": index * OFFSET if index else None,
            "read_in_epoch": 1 + unit * layout.samples + index,
            "rng": rng_state(new_rng(seed, "shuffle", name, slot, epoch)),
            "buffer": buffer,
        }
    packer = []
    while len(packer) < args.pack_buffer + args.pending * args.pack_size:
        before = len(packer)
        for name in layout.names:
            packer += [_key(name, epoch, s, i) for s, i in _take(read[name], 1)]
        if len(packer) == before:
            break
    cut = len(packer) - args.pending * args.pack_size
    pending = [packer[i : i + args.pack_size] for i in range(max(cut, 0), len(packer), args.pack_size)]
    packs = int(rng.integers(1000, 2000))
    return {
        "version": STATE_VERSION,
        "slot": slot,
        "slots": slots,
        "readers": readers,
        "mixture": rng_state(new_rng(seed, "mixture", slot)),
        "weights": [1.0] * len(layout.names),
        "packer": {
            "buffer": packer[: max(cut, 0)],
            "seen_tokens": packs * 8192,
            "seen_patches": packs * 30000,
            "counts": {"dropped/too_long": int(rng.integers(3))},
        },
        "pending": pending,
        "failures": 0,
        "skipped": {f"{layout.names[0]}/corrupt_image": int(rng.integers(5))},
        "packs": packs,
    }


def _take(it: Iterator, count: int) -> list:
    return [x for _, x in zip(range(count), it)]


def build_states(layout: Layout) -> list[dict[str, Any]]:
    args = layout.args
    slots = args.ranks * args.workers
    return [
        {
            "version": LOADER_STATE_VERSION,
            "seed": layout.seed,
            "rank": rank,
            "world_size": args.ranks,
            "workers": args.workers,
            "next_worker": 0,
            "weights": dict.fromkeys(layout.names, 1.0),
            "shards": dict(layout.shards),
            "worker_states": [_slot_state(layout, rank * args.workers + w, slots) for w in range(args.workers)],
        }
        for rank in range(args.ranks)
    ]


# ---- the check ---------------------------------------------------------------------------------------------------


class Outstanding:
    """What is left to train of the epochs in flight, read from the states as their readers will go on."""

    def __init__(self, layout: Layout, states: list[dict[str, Any]], last_epoch: int):
        self.units: Counter = Counter()  # (source, epoch, shard, part, parts, from index)
        self.keys: Counter = Counter()  # (source, epoch, shard url, index)
        slot_states = [w for s in sorted(states, key=lambda s: s["rank"]) for w in s["worker_states"]]
        for slot, state in enumerate(slot_states):
            for name in layout.names:
                self._reader(layout, name, state["readers"][name], slot, len(slot_states), last_epoch)
            keys = state["packer"]["buffer"] + [k for pack in state["pending"] for k in pack]
            keys += [k for r in state["readers"].values() for k in r["buffer"]]
            self.keys.update((k["source"], k["epoch"], k["url"], k["index"]) for k in keys)

    def _reader(self, layout: Layout, name: str, reader: dict, slot: int, slots: int, last_epoch: int) -> None:
        dealt = reader.get("dealt", [])
        for epoch in range(reader["epoch"], last_epoch + 1):
            n = epoch - reader["epoch"]
            if n < len(dealt):
                units = [(u[0], u[1], u[2], u[3]) for u in dealt[n]]
            else:
                deal = slot_units(layout.shards[name], slot, slots, layout.seed, name, epoch)
                units = [(u.shard, u.part, u.parts, 0) for u in deal]
            first = reader["unit"] if n == 0 else 0
            for i, (shard, part, parts, start) in enumerate(units[first:]):
                if n == 0 and i == 0:
                    start = reader["index"]  # the reader's cursor in its current unit
                self.units[(name, epoch, shard, part, parts, start)] += 1

    def samples(self, layout: Layout) -> int:
        """Samples left: those of the units left from their start on, and the buffered ones."""
        total = sum(self.keys.values())
        for (_, _, _, part, parts, start), count in self.units.items():
            total += count * len(range(start + (part - start) % parts, layout.samples, parts))
        return total

    def part_read(self) -> int:
        return sum(count for unit, count in self.units.items() if unit[5] > 0)

    def problems(self, layout: Layout) -> list[str]:
        """A unit on two slots, a sample buffered twice, or a buffered sample its unit would read again."""
        found = []
        twice = Counter((n, e, s, p, q) for (n, e, s, p, q, _), c in self.units.items() for _ in range(c))
        found += [f"unit {u} is dealt {c} times" for u, c in twice.items() if c > 1][:5]
        found += [f"sample {k} is buffered {c} times" for k, c in self.keys.items() if c > 1][:5]
        starts = defaultdict(list)
        for name, epoch, shard, part, parts, start in self.units:
            starts[(name, epoch, _url(name, shard))].append((part, parts, start))
        for name, epoch, url, index in self.keys:
            if any(index % q == p and index >= s for p, q, s in starts.get((name, epoch, url), [])):
                found.append(f"buffered sample {index} of {url} (epoch {epoch}) is read again by its unit")
                break
        return found


def last_epoch(*runs: list[dict[str, Any]]) -> int:
    """The last epoch some reader is in, or has explicit units of."""
    readers = [r for states in runs for s in states for w in s["worker_states"] for r in w["readers"].values()]
    return max(r["epoch"] + max(len(r.get("dealt", [])), 1) - 1 for r in readers)


def compare(
    layout: Layout, before: Outstanding, after: Outstanding, old: list[dict[str, Any]], new: list[dict[str, Any]]
) -> list[str]:
    """What the new states would read or train differently from the old ones (nothing, when all is well)."""
    problems = after.problems(layout)
    if not dict.__eq__(before.units, after.units):  # as dicts: Counter's == is slow in Python at this size
        problems.append(
            f"units left differ: {len(before.units - after.units)} lost, {len(after.units - before.units)} new"
        )
    if not dict.__eq__(before.keys, after.keys):
        problems.append(
            f"buffered samples differ: {len(before.keys - after.keys)} lost, {len(after.keys - before.keys)} new"
        )
    samples = (before.samples(layout), after.samples(layout))
    if samples[0] != samples[1]:
        problems.append(f"samples left: {samples[0]} before, {samples[1]} after")
    totals = lambda states, field: sum((Counter(w[field]) for s in states for w in s["worker_states"]), Counter())
    if totals(old, "skipped") != totals(new, "skipped"):
        problems.append("the skip counts' totals changed")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=8, help="loader workers (reader slots) per rank")
    parser.add_argument("--new-ranks", type=int, default=896)
    parser.add_argument("--new-workers", type=int, default=0, help="0: as --workers")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--shards", type=int, default=100_000, help="shards of all sources together")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--buffer", type=int, default=24, help="restore keys in each reader's shuffle buffer")
    parser.add_argument("--pack-buffer", type=int, default=32, help="restore keys in each slot's packer buffer")
    parser.add_argument("--pending", type=int, default=2, help="packs formed, not handed out, per slot")
    parser.add_argument("--pack-size", type=int, default=6, help="samples per pending pack")
    parser.add_argument("--ahead-every", type=int, default=20, help="every n-th slot is in epoch 1 already")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    new_workers = args.new_workers or args.workers
    layout = Layout(args)
    seconds = {}

    start = time.perf_counter()
    states = build_states(layout)
    seconds["build"] = time.perf_counter() - start
    start = time.perf_counter()
    files = [dumps(s) for s in states]  # as the checkpoint writes loader_rankNNNNN.json
    seconds["json_write"] = time.perf_counter() - start
    start = time.perf_counter()
    states = [json.loads(f) for f in files]
    seconds["json_read"] = time.perf_counter() - start

    start = time.perf_counter()
    position = merge_loader_states(states)  # the shard counts the states were saved with
    seconds["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    new = [deal_loader_state(position, args.new_ranks, new_workers, 0)]
    seconds["deal_one_rank"] = time.perf_counter() - start
    new += [deal_loader_state(position, args.new_ranks, new_workers, r) for r in range(1, args.new_ranks)]
    seconds["deal_all_ranks"] = time.perf_counter() - start
    start = time.perf_counter()
    new_files = [dumps(s) for s in new]
    seconds["json_write_new"] = time.perf_counter() - start

    # Once more, the re-dealt states back to the old layout: they hold explicit units of the epochs in flight (as
    # the states of a run resized twice do), which a second merge must read.
    new = [json.loads(f) for f in new_files]
    start = time.perf_counter()
    again = merge_loader_states(new)
    back = [deal_loader_state(again, args.ranks, args.workers, r) for r in range(args.ranks)]
    seconds["redeal_back_to_old_layout"] = time.perf_counter() - start

    start = time.perf_counter()
    last = last_epoch(states, new, back)
    before, after = Outstanding(layout, states, last), Outstanding(layout, new, last)
    problems = compare(layout, before, after, states, new)
    problems += [f"back: {p}" for p in compare(layout, before, Outstanding(layout, back, last), states, back)]
    seconds["check_both"] = time.perf_counter() - start

    report = {
        "tool": "redeal_at_scale",
        "ok": not problems,
        "problems": problems,
        "old": {
            "ranks": args.ranks,
            "workers": args.workers,
            "slots": args.ranks * args.workers,
            "json_bytes": sum(map(len, files)),
            "json_bytes_per_rank_max": max(map(len, files)),
        },
        "new": {
            "ranks": args.new_ranks,
            "workers": new_workers,
            "slots": args.new_ranks * new_workers,
            "json_bytes": sum(map(len, new_files)),
            "json_bytes_per_rank_max": max(map(len, new_files)),
        },
        "sources": args.sources,
        "shards": args.shards,
        "epochs_in_flight": sorted({key[1] for key in after.units}),
        "units_left": sum(after.units.values()),
        "units_part_read": after.part_read(),
        "buffered_keys": sum(after.keys.values()),
        "samples_left": after.samples(layout),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "seconds_per_new_rank": round(seconds["json_read"] + seconds["merge"] + seconds["deal_one_rank"], 3),
    }
    print(dumps(report, indent=2))


if __name__ == "__main__":
    main()
