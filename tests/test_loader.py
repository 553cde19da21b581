import io
import itertools
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from helpers import encoder
from vlm_train.data.config import DataConfig
from vlm_train.data.loader import PackedStream, Source, expand_urls


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56 + 28 * (seed % 3), 56), (seed * 40 % 255, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder, shards: int, per_shard: int, bad: dict[str, dict] | None = None) -> list[str]:
    """Caption shards in the img2dataset layout; `bad` replaces some samples' members by key."""
    urls = []
    for s in range(shards):
        url = str(folder / f"shard-{s:03d}.tar")
        with wds.TarWriter(url) as writer:
            for i in range(per_shard):
                key = f"s{s}i{i}"
                members = (bad or {}).get(key, {"png": _png(i), "txt": f"a red circle number {i}"})
                writer.write({"__key__": key, **members})
        urls.append(url)
    return urls


def _config(**pack) -> DataConfig:
    cfg = DataConfig(shuffle_buffer=4)
    cfg.pack.llm_budget = pack.get("llm_budget", 400)
    cfg.pack.buffer_size = pack.get("buffer_size", 4)
    return cfg


def test_bad_samples_are_counted_per_source_and_reason(tmp_path):
    bad = {
        "s0i1": {"png": b"garbage", "txt": "x"},
        "s0i2": {"png": _png(2), "json": b"{broken"},
        "s1i0": {"txt": "no image"},
    }
    urls = write_shards(tmp_path, 2, 6, bad)
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=0, rank=0, world_size=1)
    skipped, keys = Counter(), []
    for batch in itertools.islice(iter(stream), 6):
        skipped.update(batch.skipped)
        keys += [m["key"] for m in batch.meta]
    assert skipped["web/corrupt_image"] >= 1 and skipped["web/bad_json"] >= 1 and skipped["web/missing_image"] >= 1
    assert not set(keys) & set(bad)
    assert {f"s{s}i{i}" for s in range(2) for i in range(6)} - set(bad) <= set(keys)


def test_truncated_tar_is_counted_and_reading_goes_on(tmp_path):
    urls = write_shards(tmp_path, 2, 6)
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[: len(data) // 2])
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=0, rank=0, world_size=1)
    skipped, keys = Counter(), set()
    for batch in itertools.islice(iter(stream), 6):
        skipped.update(batch.skipped)
        keys |= {m["key"] for m in batch.meta}
    assert skipped["web/shard_error"] >= 1
    assert {f"s1i{i}" for i in range(6)} <= keys


def test_a_run_of_failures_is_fatal_and_names_shard_and_key(tmp_path):
    urls = write_shards(tmp_path, 1, 8, {f"s0i{i}": {"png": b"bad", "txt": "x"} for i in range(8)})
    cfg = _config()
    cfg.max_consecutive_failures = 5
    stream = PackedStream([Source("web", urls)], encoder(), cfg, seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"shard-000\.tar key s0i\d"):
        next(iter(stream))


def test_sample_longer_than_the_budget_is_skipped(tmp_path):
    urls = write_shards(tmp_path, 1, 4, {"s0i0": {"png": _png(0), "txt": "long " * 300}})
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=0, rank=0, world_size=1)
    batch = next(iter(stream))
    assert batch.skipped.get("web/too_long", 0) + sum(1 for m in batch.meta if m["key"] == "s0i0") >= 1
    assert all(m["key"] != "s0i0" for m in batch.meta)


@pytest.mark.parametrize("shards,slots", [(4, 2), (4, 5), (6, 4)])
def test_readers_split_a_source_disjointly_and_completely(tmp_path, shards, slots):
    urls = write_shards(tmp_path, shards, 5)
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=3, rank=0, world_size=1)
    seen = []
    for slot in range(slots):
        # One epoch of this reader: whole shards when there are enough, else every slots-th sample.
        share = len(range(slot, shards, slots)) * 5 if shards >= slots else len(range(slot, shards * 5, slots))
        reader = stream._source_samples(stream.sources[0], slot, slots, Counter())
        seen += [raw["__key__"] for raw in itertools.islice(reader, share)]
    assert sorted(seen) == sorted(f"s{s}i{i}" for s in range(shards) for i in range(5))


def test_pipe_urls_and_empty_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shell-command"):
        expand_urls("pipe:curl -s http://example.com/{0..3}.tar")
    with pytest.raises(ValueError, match="no shards"):
        PackedStream([Source("web", [])], encoder(), _config(), seed=0, rank=0, world_size=1)
    assert expand_urls(str(tmp_path / "x-{000..002}.tar"))[-1].endswith("x-002.tar")
