"""Re-dealing the loader states of all ranks to another world size or worker count (vlm_train/data/redeal.py).

The property that matters: across a change of layout, every sample of the epochs in flight is trained exactly once,
none lost, none repeated; with the same layout nothing changes and the resume stays exact.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import torch

from tools.redeal_at_scale import main as redeal_at_scale
from vlm_train.data.batch import PackedBatch
from vlm_train.data.loader import LOADER_STATE_VERSION, PackedLoader, PackedStream, Source, build_loader
from vlm_train.data.redeal import merge_loader_states, redeal_all_loader_states, redeal_loader_states
from vlm_train.data.state import find_restore_keys

from helpers import encoder
from test_loader import _config, write_shards

SEED = 3
# Uneven shards, so that some slots finish their share of epoch 0 and go on into epoch 1 well before others; source b
# has fewer shards than the 4 slots of 2 ranks x 2 workers, so they are read as slices.
SIZES = {"a": [4, 14, 6, 11, 3], "b": [9, 5, 8]}
BAD = {("a", 1, 2), ("b", 0, 4)}  # (source, shard, index): corrupt images, skipped and counted


def _shards(tmp_path) -> dict[str, list[str]]:
    urls = {}
    for name, sizes in SIZES.items():
        urls[name] = []
        for shard, size in enumerate(sizes):
            bad = {f"s0i{i}": {"png": b"junk", "txt": "x"} for i in range(size) if (name, shard, i) in BAD}
            urls[name] += write_shards(tmp_path / name / str(shard), 1, size, bad)
    return urls


def _every_good_sample(urls: dict[str, list[str]], epochs: int = 1) -> Counter:
    """Each good sample of epochs 0..epochs-1 once, as (epoch, source, shard url, index)."""
    return Counter(
        (epoch, name, urls[name][shard], i)
        for epoch in range(epochs)
        for name, sizes in SIZES.items()
        for shard, size in enumerate(sizes)
        for i in range(size)
        if (name, shard, i) not in BAD
    )


def _shard_counts(urls: dict[str, list[str]]) -> dict[str, int]:
    return {name: len(u) for name, u in urls.items()}


def _stream(urls: dict[str, list[str]], rank: int, world: int, seed: int = SEED) -> PackedStream:
    sources = [Source(name, list(u)) for name, u in urls.items()]
    return PackedStream(sources, encoder(), _config(llm_budget=120), seed=seed, rank=rank, world_size=world)


class _Workers:
    """One rank's loader with several workers, run in this process: its slot streams in turn, and the state
    PackedLoader keeps (test_resume.py checks that the two agree): None for a worker that has handed out no pack."""

    def __init__(self, stream: PackedStream, workers: int, state: dict[str, Any] | None = None):
        self.stream, self.workers = stream, workers
        saved = state["worker_states"] if state else [None] * workers
        stream.worker_states = list(saved)
        self.slots = [stream.slot_stream(worker, workers) for worker in range(workers)]
        self.handed_out = [s is not None for s in saved]
        self.next_worker = state["next_worker"] if state else 0

    def __next__(self) -> PackedBatch:
        worker = self.next_worker
        pack = self.slots[worker].next_pack()
        self.handed_out[worker] = True
        self.next_worker = (worker + 1) % self.workers
        return pack

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": LOADER_STATE_VERSION,
            "seed": self.stream.seed,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "workers": self.workers,
            "next_worker": self.next_worker,
            "weights": {s.name: w for s, w in zip(self.stream.sources, self.stream.weights)},
            "shards": {s.name: len(s.urls) for s in self.stream.sources},
            "worker_states": [s.state_dict() if h else None for s, h in zip(self.slots, self.handed_out)],
        }


def _rank(urls, rank: int, world: int, workers: int, state: dict[str, Any] | None = None):
    """A rank's loader: a real PackedLoader in this process for one worker, _Workers for more."""
    stream = _stream(urls, rank, world)
    if workers > 1:
        if state is not None:  # the real loader takes the state (its checks pass) before we run it in this process
            PackedLoader(_stream(urls, rank, world), workers).load_state_dict(state)
        return _Workers(stream, workers, state)
    loader = build_loader(stream, 0)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def _states(ranks) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(r.state_dict())) for r in ranks]  # as a checkpoint saves and reads them


def _redeal(urls, ranks, world: int, workers: int) -> list:
    states = _states(ranks)
    new = [redeal_loader_states(states, world, workers, r) for r in range(world)]  # the states know their shards
    _check_conserved(states, new)
    return [_rank(urls, r, world, workers, json.loads(json.dumps(s))) for r, s in enumerate(new)]


def _check_conserved(old: list[dict], new: list[dict]) -> None:
    """Every buffered restore key goes to exactly one new slot, and the skip counts keep their totals."""
    keys = lambda states: Counter(json.dumps(k, sort_keys=True) for s in states for k in find_restore_keys(s))
    assert keys(new) == keys(old)
    skipped = lambda states: sum((Counter(w["skipped"]) for s in states for w in s["worker_states"] if w), Counter())
    assert skipped(new) == skipped(old)


def _in_flight(states: list[dict], epoch: int) -> bool:
    """Whether some slot still has samples of `epoch` (or an earlier one) to read or to hand out."""
    for state in states:
        for worker in state["worker_states"]:
            if worker is None or any(r["epoch"] <= epoch for r in worker["readers"].values()):
                return True
            if any(k["epoch"] <= epoch for k in find_restore_keys(worker)):
                return True
    return False


def _step(ranks, trained: Counter) -> None:
    """One pack from every rank; counts the samples trained, as (epoch, source, shard url, index)."""
    for rank in ranks:
        for m in next(rank).meta:
            key = m["restore_key"]
            trained[(key["epoch"], key["source"], key["url"], key["index"])] += 1


def _to_epoch_end(ranks, trained: Counter, epoch: int = 0, limit: int = 400) -> None:
    """Packs until no slot has a sample of `epoch` or an earlier one left to read or to hand out."""
    for _ in range(limit):
        if not _in_flight(_states(ranks), epoch):
            return
        _step(ranks, trained)
    raise AssertionError(f"epoch {epoch} still in flight after {limit} packs a rank: samples lost?")


def _trained_by(trained: Counter, epochs: int) -> Counter:
    return Counter({k: n for k, n in trained.items() if k[0] < epochs})


def _form_pending(ranks) -> None:
    """Form a pack ahead on every slot, not handed out: pending packs (a sample that completes two packs at once) are
    rare with these small budgets, and a re-deal must carry them too."""
    for rank in ranks:
        for slot in rank.slots if isinstance(rank, _Workers) else [rank._local]:
            while not slot.pending:
                slot._step()


def _epochs(states: list[dict]) -> set[int]:
    return {r["epoch"] for s in states for w in s["worker_states"] if w for r in w["readers"].values()}


@pytest.mark.parametrize("workers", [(1, 1, 1), (2, 1, 2)], ids=["1-worker", "2-workers"])
def test_every_sample_of_the_epoch_is_trained_once_across_two_resizes(tmp_path, workers):
    """2 ranks, then 3, then 1 (workers per rank in each phase as given) train the same samples of epochs 0 and 1 as
    2 ranks uninterrupted: each exactly once. Slots run ahead of each other, so both epochs are in flight at the
    first re-deal (and the re-dealt ones at the second)."""
    urls = _shards(tmp_path)
    expected = _every_good_sample(urls, epochs=2)
    w2, w3, w1 = workers

    reference = Counter()
    _to_epoch_end([_rank(urls, r, 2, w2) for r in range(2)], reference, epoch=1)
    assert _trained_by(reference, 2) == expected

    trained = Counter()
    ranks = [_rank(urls, r, 2, w2) for r in range(2)]
    for _ in range(6):
        _step(ranks, trained)
    _form_pending(ranks)
    states = _states(ranks)
    epochs = _epochs(states)
    assert min(epochs) == 0 and max(epochs) >= 1, "some slots should be past epoch 0 already, others still in it"
    assert all(w["pending"] for s in states for w in s["worker_states"])
    ranks = _redeal(urls, ranks, 3, w3)
    for _ in range(3):
        _step(ranks, trained)
    states = _states(ranks)
    assert any("dealt" in r for s in states for w in s["worker_states"] for r in w["readers"].values())
    ranks = _redeal(urls, ranks, 1, w1)
    _to_epoch_end(ranks, trained, epoch=1)
    trained = _trained_by(trained, 2)
    assert trained == expected, (
        f"lost: {sorted(expected - trained)}, repeated: {sorted(k for k, n in trained.items() if n > 1)}"
    )


def test_dealing_every_rank_at_once_equals_dealing_each_rank(tmp_path):
    """What rank 0 computes once for all ranks (one merge) is what each rank would compute for itself: for another
    number of slots (merged), the same number (regrouped) and the same layout (kept)."""
    urls = _shards(tmp_path)
    ranks = [_rank(urls, r, 2, 2) for r in range(2)]
    for _ in range(5):
        _step(ranks, Counter())
    states = _states(ranks)
    for world, workers in ((3, 1), (4, 1), (2, 2), (1, 3)):
        each = [redeal_loader_states(states, world, workers, r) for r in range(world)]
        assert redeal_all_loader_states(states, world, workers) == each, (world, workers)


def test_a_redeal_of_states_with_workers_that_handed_out_nothing(tmp_path):
    """A worker that has handed out no pack has no state (None): all of its share is left, as for a fresh loader."""
    urls = _shards(tmp_path)
    for packs in (0, 1):  # before any pack: every worker None; after one pack a rank: each rank's worker 1
        trained = Counter()
        ranks = [_rank(urls, r, 2, 2) for r in range(2)]
        for _ in range(packs):
            _step(ranks, trained)
        assert all(s["worker_states"][1] is None for s in _states(ranks))
        ranks = _redeal(urls, ranks, 3, 1)
        _to_epoch_end(ranks, trained)
        assert _trained_by(trained, 1) == _every_good_sample(urls)


def _same(a: PackedBatch, b: PackedBatch) -> bool:
    tensors = ("input_ids", "labels", "position_ids", "pixel_values", "image_grid_thw")
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors) and [m["restore_key"] for m in a.meta] == [
        m["restore_key"] for m in b.meta
    ]


def test_the_same_layout_gives_each_state_back_unchanged_and_resumes_exactly(tmp_path):
    urls = _shards(tmp_path)
    uninterrupted = [_rank(urls, r, 2, 1) for r in range(2)]
    expected = [[next(r) for _ in range(8)] for r in uninterrupted]
    ranks = [_rank(urls, r, 2, 1) for r in range(2)]
    for _ in range(3):
        [next(r) for r in ranks]
    states = _states(ranks)
    again = [redeal_loader_states(states[::-1], 2, 0, r) for r in range(2)]
    assert again == states and again[0] is not states[0]
    resumed = [_rank(urls, r, 2, 1, again[r]) for r in range(2)]
    assert all(_same(next(resumed[r]), expected[r][i]) for i in range(3, 8) for r in range(2))


def test_the_same_number_of_slots_keeps_every_slot_exact(tmp_path):
    """2 ranks x 2 workers -> 4 ranks x 1: slot s stays slot s, so each new rank goes on exactly as its old slot."""
    urls = _shards(tmp_path)
    ranks = [_rank(urls, r, 2, 2) for r in range(2)]
    for _ in range(5):
        [next(r) for r in ranks]
    states = _states(ranks)
    slots = [w for s in states for w in s["worker_states"]]
    new = [redeal_loader_states(states, 4, 1, r) for r in range(4)]
    assert [s["worker_states"][0] for s in new] == slots
    continued = [[ranks[s // 2].slots[s % 2].next_pack() for _ in range(4)] for s in range(4)]
    for slot, state in enumerate(new):
        loader = _rank(urls, slot, 4, 1, state)
        assert all(_same(next(loader), pack) for pack in continued[slot])


def test_a_redealt_state_saved_again_resumes_exactly(tmp_path):
    """The explicit units of a re-deal are part of the state: a save and restore in a re-dealt epoch changes
    nothing."""
    urls = _shards(tmp_path)
    ranks = [_rank(urls, r, 2, 1) for r in range(2)]
    for _ in range(4):
        [next(r) for r in ranks]
    states = _states(ranks)
    state = redeal_loader_states(states, 3, 1, 1)
    loader = _rank(urls, 1, 3, 1, state)
    next(loader)
    saved = json.loads(json.dumps(loader.state_dict()))
    assert any("dealt" in r for r in saved["worker_states"][0]["readers"].values())
    expected = [next(loader) for _ in range(8)]
    restored = _rank(urls, 1, 3, 1, saved)
    assert all(_same(next(restored), pack) for pack in expected)


def test_a_different_layout_is_still_refused_by_the_loader(tmp_path):
    urls = _shards(tmp_path)
    state = json.loads(json.dumps(_rank(urls, 0, 2, 1).state_dict()))
    with pytest.raises(ValueError, match="world_size=2 .* world_size=3 .*redeal_loader_states"):
        _rank(urls, 0, 3, 1, state)


def _fresh_state(urls, rank: int, seed: int = SEED, names: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    sources = [Source(n, urls.get(n, urls["a"])) for n in names]
    stream = PackedStream(sources, encoder(), _config(), seed=seed, rank=rank, world_size=2)
    return json.loads(json.dumps(build_loader(stream, 0).state_dict()))


def test_states_of_different_runs_or_sources_are_refused_naming_the_mismatch(tmp_path):
    urls = _shards(tmp_path)
    state = lambda rank, **kw: _fresh_state(urls, rank, **kw)
    with pytest.raises(ValueError, match="disagree on the seed .*rank 0: 3, rank 1: 4"):
        redeal_loader_states([state(0), state(1, seed=4)], 3, 1, 0)
    with pytest.raises(ValueError, match=r"disagree on the sources: rank 1 has \['a', 'c'\], rank 0 has \['a', 'b'\]"):
        redeal_loader_states([state(0), state(1, names=("a", "c"))], 3, 1, 0)
    with pytest.raises(ValueError, match=r"ranks \[0, 0\], not each of ranks 0..1 once"):
        redeal_loader_states([state(0), state(0)], 3, 1, 0)
    with pytest.raises(ValueError, match="rank 3 is outside 0..2"):
        redeal_loader_states([state(0), state(1)], 3, 1, 3)


def test_shard_counts_come_from_the_states_or_the_caller_and_must_agree(tmp_path):
    urls = _shards(tmp_path)
    states = [_fresh_state(urls, r) for r in range(2)]
    counts = _shard_counts(urls)
    assert merge_loader_states(states).shards == counts == states[0]["shards"]
    with pytest.raises(
        ValueError, match=r"saved with shard counts \{'a': 5, 'b': 3\}, not \{'a': 6, 'b': 3\}: a source's"
    ):
        merge_loader_states(states, {**counts, "a": 6})
    with pytest.raises(ValueError, match=r"shard counts are given for sources \['a'\] .* sources \['a', 'b'\]"):
        merge_loader_states([{k: v for k, v in s.items() if k != "shards"} for s in states], {"a": 5})
    old = [{k: v for k, v in s.items() if k != "shards"} for s in states]  # saved before re-dealing existed
    with pytest.raises(ValueError, match=r"ranks \[0, 1\] hold no shard counts .* pass shards="):
        redeal_loader_states(old, 3, 1, 0)
    assert redeal_loader_states(old, 2, 1, 1) == old[1]  # no merge, no shard counts needed
    assert redeal_loader_states(old, 3, 1, 0, shards=counts)["shards"] == counts
    for s in old:
        s["worker_states"] = [_fake_slot_state(s, unit=3)]
    with pytest.raises(ValueError, match="unit 3 of epoch 0 .* pass the shard counts of the run that saved"):
        merge_loader_states(old, {**counts, "a": 1})  # the deal of 1 shard gives each slot 1 unit


def _fake_slot_state(state: dict, unit: int) -> dict:
    """A slot state whose readers are at `unit` of epoch 0 (for the checks: never read)."""
    reader = {"epoch": 0, "unit": unit, "index": 0, "offset": None, "read_in_epoch": 0, "rng": {}, "buffer": []}
    return {
        "version": 1,
        "slot": state["rank"],
        "slots": 2,
        "readers": {n: dict(reader) for n in state["weights"]},
        "packer": {"buffer": [], "seen_tokens": 0, "seen_patches": 0},
        "pending": [],
        "skipped": {},
        "packs": 0,
    }


def test_redeal_at_scale_tool_says_ok_at_a_small_scale(capsys):
    redeal_at_scale(["--ranks", "16", "--workers", "2", "--new-ranks", "12", "--shards", "1000"])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["problems"] == [], report
    assert report["old"]["slots"] == 32 and report["new"]["slots"] == 24
    assert report["units_left"] > 0 and report["units_part_read"] > 0 and report["buffered_keys"] > 0
    assert report["epochs_in_flight"] == [0, 1]
