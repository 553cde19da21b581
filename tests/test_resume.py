"""Exact resume: after a restore the packs equal those of an uninterrupted run, and an epoch is read exactly once."""

import gzip
import io
import json
import os
from collections import Counter
from dataclasses import fields

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm_train.data import sources as sources_module
from vlm_train.data import tar_reader as tar_reader_module
from vlm_train.data.batch import PackedBatch
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.formats import parse_sample
from vlm_train.data.loader import PackedLoader, PackedStream, Source, build_loader
from vlm_train.data.packer import PackConfig, Packer
from vlm_train.data.state import find_restore_keys
from vlm_train.data.tar_reader import fetch_samples

from helpers import encoder
from test_loader import _config, _png, write_shards

BAD = {"s0i3": {"png": b"junk", "txt": "x"}, "s2i7": {"png": _png(1), "json": b"{oops"}}


def _loader(urls, workers=0, rank=0, world=1, seed=0, sources=None) -> PackedLoader:
    sources = sources or [Source("web", urls)]
    stream = PackedStream(sources, encoder(), _config(llm_budget=120), seed=seed, rank=rank, world_size=world)
    return build_loader(stream, workers)


def _same(a: PackedBatch, b: PackedBatch) -> bool:
    for f in fields(PackedBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if torch.is_tensor(x) and not torch.equal(x, y):
            return False
    return [m["key"] for m in a.meta] == [m["key"] for m in b.meta] and a.skipped == b.skipped


def _run(make, total: int, restore_at=(), set_weights_at=None) -> tuple[list[PackedBatch], list[dict]]:
    """`total` packs from a loader that is saved, dropped and rebuilt from JSON before each pack in `restore_at`;
    returns the packs and the state before each of them."""
    loader, packs, states = make(), [], []
    for i in range(total):
        if set_weights_at is not None and i == set_weights_at[0]:
            loader.set_weights(set_weights_at[1])
        state = json.loads(json.dumps(loader.state_dict()))
        states.append(state)
        if i in restore_at:
            loader.close()
            loader = make()
            loader.load_state_dict(state)
        packs.append(next(loader))
    loader.close()
    return packs, states


def _epochs(state: dict, source: str = "web") -> list[int]:
    """The epoch each worker's reader of `source` is in (workers that have not started count as 0)."""
    return [w["readers"][source]["epoch"] if w else 0 for w in state["worker_states"]]


def _restore_points(states: list[dict]) -> tuple[int, int, int]:
    """Two points inside the first epoch of every worker, and one after every worker crossed into the next."""
    first = [i for i, s in enumerate(states) if max(_epochs(s)) == 0 and i > 0]
    later = [i for i, s in enumerate(states) if min(_epochs(s)) >= 1]
    assert len(first) >= 3 and later, "the test data should span more than one epoch"
    return first[len(first) // 3], first[2 * len(first) // 3], later[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_packs_after_restores_equal_an_uninterrupted_run_across_an_epoch(tmp_path, workers):
    urls = write_shards(tmp_path, 4, 12, BAD)
    make = lambda: _loader(urls, workers)
    expected, states = _run(make, 24)
    points = _restore_points(states)
    restored, _ = _run(make, 24, restore_at=points)
    assert all(_same(a, b) for a, b in zip(expected, restored))
    assert max(m["restore_key"]["epoch"] for p in restored for m in p.meta) >= 1


def test_a_restore_before_every_pack_changes_nothing(tmp_path):
    urls = write_shards(tmp_path, 3, 7, BAD)
    make = lambda: _loader(urls, 0)
    expected, _ = _run(make, 16)
    restored, states = _run(make, 16, restore_at=range(1, 16))
    assert all(_same(a, b) for a, b in zip(expected, restored)) and _epochs(states[-1])[0] >= 1


def test_two_ranks_resume_exactly_and_never_share_a_sample(tmp_path):
    urls = write_shards(tmp_path, 3, 10, BAD)  # 3 shards for 2 ranks x 2 workers: shards are sliced
    epoch0 = {}
    for rank in (0, 1):
        make = lambda rank=rank: _loader(urls, workers=2, rank=rank, world=2)
        expected, _ = _run(make, 10)
        restored, _ = _run(make, 10, restore_at=(3, 7))
        assert all(_same(a, b) for a, b in zip(expected, restored))
        epoch0[rank] = {m["key"] for p in restored for m in p.meta if m["restore_key"]["epoch"] == 0}
    assert epoch0[0] and epoch0[1] and not epoch0[0] & epoch0[1]


def test_one_epoch_with_two_restores_reads_every_sample_exactly_once(tmp_path):
    urls = write_shards(tmp_path, 4, 9, BAD)
    good = {f"s{s}i{i}" for s in range(4) for i in range(9)} - set(BAD)
    make = lambda: _loader(urls, workers=2)
    _, states = _run(make, 20)
    points = _restore_points(states)[:2]
    packs, _ = _run(make, 20, restore_at=points)
    seen = Counter(m["key"] for p in packs for m in p.meta if m["restore_key"]["epoch"] == 0)
    assert set(seen) == good and set(seen.values()) == {1}
    skipped = Counter()
    for p in packs:
        skipped.update(p.skipped)
    assert skipped["web/corrupt_image"] >= 1 and skipped["web/bad_json"] >= 1


def test_restore_reads_only_the_buffered_samples_by_offset(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 3, 10)
    reads = Counter()

    def counting(url, start_index=0, start_offset=None):
        for raw in real(url, start_index, start_offset):
            reads[url] += 1
            yield raw

    real = tar_reader_module.iter_shard
    monkeypatch.setattr(tar_reader_module, "iter_shard", counting)
    monkeypatch.setattr(sources_module, "iter_shard", counting)
    loader = _loader(urls)
    for _ in range(5):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    buffered = len({(k["url"], k["index"]) for k in find_restore_keys(state)})  # an epoch apart, read once
    reads.clear()
    expected = [next(loader) for _ in range(2)]
    uninterrupted_reads = sum(reads.values())
    reads.clear()
    restored = _loader(urls)
    restored.load_state_dict(state)
    assert all(_same(next(restored), e) for e in expected)
    # The buffers came back one sample each (by seek), and reading went on from the cursor, not the shard start.
    assert buffered > 0 and sum(reads.values()) == buffered + uninterrupted_reads


def test_compressed_shards_resume_exactly_by_rereading_the_shard(tmp_path):
    urls = []
    for url in write_shards(tmp_path, 2, 8, BAD):
        with open(url, "rb") as f, gzip.open(url + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(url)
        urls.append(url + ".gz")
    make = lambda: _loader(urls)
    expected, _ = _run(make, 12)
    restored, _ = _run(make, 12, restore_at=(4, 9))
    assert all(_same(a, b) for a, b in zip(expected, restored))


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_override_is_part_of_the_state(tmp_path, workers):
    urls = write_shards(tmp_path, 4, 8)
    sources = lambda: [Source("a", urls[:2]), Source("b", urls[2:], weight=3.0)]
    make = lambda: _loader(urls, workers, sources=sources())
    switch = (6, {"a": 1.0})
    expected, _ = _run(make, 26, set_weights_at=switch)
    restored, states = _run(make, 26, restore_at=(3, 11), set_weights_at=switch)
    assert all(_same(x, y) for x, y in zip(expected, restored))
    assert states[3]["weights"] == {"a": 1.0, "b": 3.0} and states[11]["weights"] == {"a": 1.0, "b": 0.0}
    late = [m["source"] for p in expected[-4:] for m in p.meta]
    assert set(late) == {"a"}  # once the buffers holding b samples drain
    with pytest.raises(ValueError, match="unknown data sources"):
        make().set_weights({"c": 1.0})


def test_a_different_world_size_or_worker_count_is_refused_but_0_and_1_workers_agree(tmp_path):
    urls = write_shards(tmp_path, 3, 10)
    loader = _loader(urls, workers=0)
    expected = [next(loader) for _ in range(6)]
    state = _run(lambda: _loader(urls, 0), 3)[1][2]  # before the third pack
    with pytest.raises(ValueError, match="world_size=1 and 1 loader worker.*world_size=1 and 2"):
        _loader(urls, workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=1 .* world_size=2"):
        _loader(urls, workers=0, world=2).load_state_dict(state)
    one = _loader(urls, workers=1)
    one.load_state_dict(state)
    assert all(_same(next(one), p) for p in expected[2:])
    one.close()


def test_a_shard_changed_since_the_state_was_saved_is_a_clear_error(tmp_path):
    urls = write_shards(tmp_path, 2, 6)
    loader = _loader(urls)
    for _ in range(2):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    for s, url in enumerate(urls):  # the same files, other samples
        with wds.TarWriter(url) as writer:
            for i in range(6):
                writer.write({"__key__": f"other{s}{i}", "png": _png(i), "txt": "x"})
    with pytest.raises(ValueError, match="shard changed since the state was saved"):
        restored = _loader(urls)
        restored.load_state_dict(state)
        next(restored)


# ---- a curriculum stage that lowers the pack budgets -------------------------------------------------------------

BIG, SMALL = (1024, 4096), (200, 48)  # (llm_budget, vit_budget) before and after the stage boundary


def _sized_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (width % 255, 100, height % 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sized_shards(folder, shards: int = 3, per_shard: int = 12) -> list[str]:
    """Captions of 28 to 520 tokens under images of 16 to 100 patches: many over SMALL, all within BIG."""
    members = {
        f"s{s}i{i}": {
            "png": _sized_png(56 + 28 * ((i + s) % 5), 56 + 28 * (i % 4)),
            "txt": "a red circle " * (1 + 12 * ((i + 2 * s) % 6)),
        }
        for s in range(shards)
        for i in range(per_shard)
    }
    return write_shards(folder, shards, per_shard, members)


def _budget_loader(urls, budgets, too_long: str, workers: int = 0) -> PackedLoader:
    cfg = DataConfig(shuffle_buffer=4)
    cfg.pack.llm_budget, cfg.pack.vit_budget = budgets
    cfg.pack.buffer_size, cfg.pack.too_long = 8, too_long
    return build_loader(PackedStream([Source("web", urls)], encoder(), cfg, seed=0, rank=0, world_size=1), workers)


def _under_small(keys: list[dict], too_long: str) -> tuple[Counter, dict[tuple, bool]]:
    """What SMALL makes of these saved samples: the drops by "source/reason", and per kept sample whether it is cut."""
    cfg = PackConfig(llm_budget=SMALL[0], vit_budget=SMALL[1], too_long=too_long)
    packer, drops, kept = Packer(cfg, special=encoder().special), Counter(), {}
    for key, raw in zip(keys, fetch_samples(keys)):
        full = encoder().encode(parse_sample(raw, "web", 10**8))
        try:
            kept[_id(key)] = packer.check(full) is not full
        except SkipSample as exc:
            drops[f"web/{exc.reason}"] += 1
    return drops, kept


def _id(key: dict) -> tuple:
    return key["key"], key["epoch"]


def _within_small(pack: PackedBatch) -> bool:
    return pack.num_tokens <= SMALL[0] and pack.num_patches <= SMALL[1] and pack.num_samples >= 1


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_lower_budgets_at_a_stage_boundary_drop_or_cut_the_buffered_samples(tmp_path, too_long):
    """A stage lowers both budgets and the loader goes on from the state saved under the old ones: what no longer
    fits follows too_long (dropped and counted, or cut), and every pack is within the new budgets."""
    urls = _sized_shards(tmp_path)
    big = _budget_loader(urls, BIG, too_long, workers=2)
    for _ in range(4):
        next(big)
    state = json.loads(json.dumps(big.state_dict()))
    big.close()
    saved_skips = Counter(big.skipped())
    expected = []  # per worker: what SMALL drops and keeps of its packing buffer and pending packs
    for worker in state["worker_states"]:
        expected.append(_under_small(find_restore_keys([worker["packer"], worker["pending"]]), too_long))
    drops = sum((d for d, _ in expected), Counter())
    cut = {k for _, kept in expected for k, is_cut in kept.items() if is_cut}
    if too_long == "drop":
        assert drops["web/too_long"] and drops["web/too_many_patches"] and not cut
    else:  # cut to fit; dropped only when no supervised token is left (an image over the ViT budget goes whole)
        assert cut and drops

    small = _budget_loader(urls, SMALL, too_long, workers=2)
    small.load_state_dict(state)
    assert small.skipped() == saved_skips
    packs = [next(small) for _ in range(30)]
    small.close()
    assert all(_within_small(p) for p in packs)
    for worker, (worker_drops, _) in enumerate(expected):
        first = packs[(worker - state["next_worker"]) % 2]  # the worker's first pack after the restore
        assert Counter(first.skipped) >= worker_drops  # the drops of the restore, with any of its own
    per_pack = sum((Counter(p.skipped) for p in packs), Counter())
    assert Counter(small.skipped()) == saved_skips + per_pack
    seen = {_id(m["restore_key"]): m for p in packs for m in p.meta}
    kept = {k for _, worker_kept in expected for k in worker_kept}
    assert kept <= set(seen)  # nothing SMALL can hold is lost
    assert {k for k in kept if "truncated_from" in seen[k]} == cut


def test_a_pending_pack_over_the_new_budgets_is_packed_again_and_one_within_them_is_kept(tmp_path):
    urls = _sized_shards(tmp_path)
    big = _budget_loader(urls, BIG, "drop")

    def fits(meta: dict) -> bool:
        sample = _encode([meta["restore_key"]])[0]
        return sample.num_tokens <= SMALL[0] and sample.num_patches <= SMALL[1]

    # A pack formed under BIG that SMALL cannot hold, with samples SMALL can hold and some it cannot; the state after
    # it, made to hold it as not handed out yet.
    for _ in range(12):
        pack = next(big)
        if not _within_small(pack) and len({fits(m) for m in pack.meta}) == 2:
            break
    else:
        pytest.fail("no pack of the stream mixes samples within and over SMALL")
    state = json.loads(json.dumps(big.state_dict()))
    worker = state["worker_states"][0]
    pending = [m["restore_key"] for m in pack.meta]
    worker["pending"] = [pending]

    same = _budget_loader(urls, BIG, "drop")  # unchanged budgets: the pending pack comes out as it was
    same.load_state_dict(state)
    again = next(same)
    assert [m["key"] for m in again.meta] == [m["key"] for m in pack.meta]
    assert torch.equal(again.input_ids, pack.input_ids) and torch.equal(again.pixel_values, pack.pixel_values)

    small = _budget_loader(urls, SMALL, "drop")
    small.load_state_dict(state)
    packs = [next(small) for _ in range(20)]
    assert all(_within_small(p) for p in packs)
    seen = {_id(m["restore_key"]) for p in packs for m in p.meta}
    assert {_id(m["restore_key"]) for m in pack.meta if fits(m)} <= seen
    assert not {_id(m["restore_key"]) for m in pack.meta if not fits(m)} & seen
    drops, _ = _under_small(pending, "drop")
    assert drops and Counter(packs[0].skipped) >= drops  # counted, on the first pack after the restore


def _encode(keys: list[dict]) -> list:
    return [encoder().encode(parse_sample(raw, "web", 10**8)) for raw in fetch_samples(keys)]


def test_the_state_after_each_pack_is_exactly_its_workers_state(tmp_path):
    """Packs carry only changes to their worker's state, yet after every pack (and across a restart of the workers
    by a mixture change) the loader's state is every worker's whole state."""
    urls = write_shards(tmp_path, 4, 10, BAD)
    sources = lambda: [Source("a", urls[:2]), Source("b", urls[2:], weight=3.0)]
    loader = _loader(urls, workers=2, sources=sources())
    reference = PackedStream(sources(), encoder(), _config(llm_budget=120), seed=0, rank=0, world_size=1)
    slots = [reference.slot_stream(worker, 2) for worker in range(2)]
    for i in range(20):
        if i == 9:
            loader.set_weights({"a": 1.0})
        if i >= 9:  # a worker takes the new mixture up with its next pack
            slots[i % 2].set_weights([1.0, 0.0])
        next(loader)
        slots[i % 2].next_pack()
        if i >= 1:
            expected = json.loads(json.dumps([slot.state_dict() for slot in slots]))
            assert json.loads(json.dumps(loader.state_dict()))["worker_states"] == expected
    loader.close()
