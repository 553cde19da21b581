"""The streaming packing algorithm on sizes alone: budgets, every item once, bounded buffer and wait, fill."""

import math
import random

import pytest

from vlm_train.data.pack_planner import Budget, Item, PackPlanner


def _run(packer: PackPlanner, sizes: list[tuple[int, int, int]], check=None) -> list[list[Item]]:
    packs = []
    for index, (tokens, patches, images) in enumerate(sizes):
        oldest = min((i.seq for i in packer.items()), default=None)
        new = packer.push(Item(tokens, patches, images, payload=index))
        if new and oldest is not None:
            assert new[0][0].seq == oldest  # each pack is anchored on the oldest buffered item
        if check:
            check(packer)
        packs += new
    return packs + packer.flush()


def _mix(n: int, seed: int) -> list[tuple[int, int, int]]:
    """Captions (image-heavy), conversations with 1-3 images, and long text, as tools/pack_mix.py but smaller."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            image = rng.randint(16, 400)
            sizes.append((image + rng.randint(10, 40), 4 * image, 1))
        elif kind < 0.85:
            images = [rng.randint(64, 400) for _ in range(rng.randint(1, 3))]
            sizes.append((sum(images) + rng.randint(50, 800), 4 * sum(images), len(images)))
        else:
            sizes.append((min(4096, int(rng.lognormvariate(math.log(900), 0.7))), 0, 0))
    return sizes


@pytest.mark.parametrize(
    "buffer,budget", [(1, Budget(4096, 16384)), (16, Budget(4096, 8192, 6)), (64, Budget(4096, 16384))]
)
def test_every_item_is_packed_once_within_every_budget(buffer, budget):
    sizes = _mix(1500, seed=buffer)
    packs = _run(PackPlanner(budget, buffer), sizes)
    assert sorted(i.payload for pack in packs for i in pack) == list(range(len(sizes)))
    for pack in packs:
        assert sum(i.tokens for i in pack) <= budget.tokens
        assert sum(i.patches for i in pack) <= budget.patches
        assert not budget.images or sum(i.images for i in pack) <= budget.images


def test_the_buffer_stays_bounded_and_no_item_waits_longer_than_a_buffer_of_packs():
    buffer = 32
    sizes = _mix(3000, seed=1)
    arrivals, emitted = {}, {}

    def check(packer):
        assert len(packer) < max(buffer, 2 * 4096)

    packer = PackPlanner(Budget(4096, 16384), buffer)
    packs = []
    for index, size in enumerate(sizes):
        arrivals[index] = len(packs)
        for pack in packer.push(Item(*size, payload=index)):
            packs.append(pack)
            emitted.update({i.payload: len(packs) for i in pack})
        check(packer)
        assert len(packer) <= buffer  # these samples are large enough that one buffer can always fill a pack
    assert max(emitted[i] - arrivals[i] for i in emitted) <= buffer


def test_packs_fill_the_token_budget_on_a_realistic_mix():
    sizes = _mix(6000, seed=2)
    packer = PackPlanner(Budget(4096, 16384), 128)
    packs = [p for size in sizes for p in packer.push(Item(*size))]
    efficiency = sum(i.tokens for p in packs for i in p) / (len(packs) * 4096)
    assert efficiency > 0.995
    # Samples of every kind share packs: the buffer does not sort the stream into one kind per pack.
    mixed = sum(len({(i.patches > 0) for i in p}) == 2 for p in packs)
    assert mixed / len(packs) > 0.5


def test_tiny_samples_are_held_until_a_pack_can_be_filled():
    rng = random.Random(3)
    sizes = [(rng.randint(20, 60), 0, 0) for _ in range(5000)]
    packer = PackPlanner(Budget(2048, 1), buffer_size=8)
    packs = [p for size in sizes for p in packer.push(Item(*size))]
    assert sum(i.tokens for p in packs for i in p) / (len(packs) * 2048) > 0.999
    assert len(packer) < 2 * 2048 // 20 + 1


def test_the_vit_budget_is_respected_when_it_binds():
    sizes = _mix(2000, seed=4)
    packs = _run(PackPlanner(Budget(4096, 6000), 64), [s for s in sizes if s[1] <= 6000])
    assert max(sum(i.patches for i in p) for p in packs) <= 6000
    assert max(sum(i.patches for i in p) for p in packs) > 5500  # it did bind


def test_same_stream_same_packs_and_restore_continues_identically():
    sizes = _mix(800, seed=5)
    budget = Budget(4096, 16384)

    def packs_of(packer, part):
        return [[i.payload for i in p] for p in _run(packer, part)]

    expected = packs_of(PackPlanner(budget, 48), sizes)
    assert packs_of(PackPlanner(budget, 48), sizes) == expected
    first = PackPlanner(budget, 48)
    head = [[i.payload for i in p] for index, s in enumerate(sizes[:300]) for p in first.push(Item(*s, payload=index))]
    restored = PackPlanner(budget, 48)
    restored.restore(
        [Item(i.tokens, i.patches, i.images, i.payload) for i in first.items()], first.seen_tokens, first.seen_patches
    )
    tail = [p for index, s in enumerate(sizes[300:], 300) for p in restored.push(Item(*s, payload=index))]
    tail = [[i.payload for i in p] for p in tail + restored.flush()]
    assert head + tail == expected


def test_bad_items_and_budgets_are_refused():
    with pytest.raises(ValueError, match="budgets must be positive"):
        Budget(0, 10)
    packer = PackPlanner(Budget(100, 100, 2), 4)
    with pytest.raises(ValueError, match="over the tokens budget"):
        packer.push(Item(101))
    with pytest.raises(ValueError, match="over the images budget"):
        packer.push(Item(10, 10, 3))
    with pytest.raises(ValueError, match="at least one token"):
        packer.push(Item(0))
