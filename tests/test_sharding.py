import itertools
from collections import Counter

import numpy as np
import pytest

from vlm_train.data.shard_assignment import reader_slot, slot_units
from vlm_train.data.sources import Source, SourceReader

from test_loader import write_shards


def _assignment(num_shards: int, ranks: int, workers: int, epoch: int, seed: int = 0) -> list[np.ndarray]:
    """Every reader slot's shard list, computed the way each worker computes its own."""
    result = []
    for rank, worker in itertools.product(range(ranks), range(workers)):
        slot, slots = reader_slot(rank, ranks, worker, workers)
        result.append(np.array([u.shard for u in slot_units(num_shards, slot, slots, seed, "web", epoch)]))
    return result


def test_1024_ranks_by_8_workers_over_100k_shards_is_disjoint_complete_and_balanced():
    num_shards = 100_000
    for epoch in (0, 1):
        lists = _assignment(num_shards, ranks=1024, workers=8, epoch=epoch)
        assert len(lists) == 8192
        every = np.concatenate(lists)
        assert every.size == num_shards and np.array_equal(np.sort(every), np.arange(num_shards))
        sizes = [len(x) for x in lists]
        assert max(sizes) - min(sizes) <= 1
    epoch0, epoch1 = _assignment(num_shards, 1024, 8, 0), _assignment(num_shards, 1024, 8, 1)
    assert sum(not np.array_equal(a, b) for a, b in zip(epoch0, epoch1)) > 8000  # reshuffled per epoch
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, _assignment(num_shards, 1024, 8, 0)))  # from the seed
    other_seed = _assignment(num_shards, 1024, 8, 0, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, other_seed))


@pytest.mark.parametrize("shards,ranks,workers", [(3, 2, 2), (5, 2, 3), (2, 3, 2), (8, 2, 2)])
def test_slots_read_every_sample_exactly_once_per_epoch_with_few_shards(tmp_path, shards, ranks, workers):
    """Fewer shards than slots: shards are sliced by sample index, and the slices are dealt out instead."""
    urls = write_shards(tmp_path, shards, 5)
    source = Source("web", urls)
    seen = Counter()
    for rank, worker in itertools.product(range(ranks), range(workers)):
        slot, slots = reader_slot(rank, ranks, worker, workers)
        reader = SourceReader(source, slot, slots, seed=3, buffer_size=4, on_skip=lambda *a: None)
        while reader.epoch == 0:
            raw = reader.next()
            if raw["__restore__"]["epoch"] == 0:
                seen[raw["__key__"]] += 1
            if reader.epoch == 0 and reader.unit >= len(reader.units) and not reader.buffer:
                break
    assert seen == Counter({f"s{s}i{i}": 1 for s in range(shards) for i in range(5)})


def test_slot_ranges_are_checked():
    with pytest.raises(ValueError, match="out of range"):
        reader_slot(2, 2, 0, 1)
    with pytest.raises(ValueError, match="no shards"):
        slot_units(0, 0, 1, 0, "web", 0)
