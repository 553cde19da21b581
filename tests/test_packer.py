import numpy as np
import pytest
import torch

from helpers import encoder, sample
from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample
from vlm_train.data.packer import PackConfig, Packer, collate


def _encoded(n: int, images: int = 1):
    enc = encoder()
    words = ["a red circle", "a blue square and a green diamond", "an orange triangle"]
    return [enc.encode(sample(f"s{i}", words[i % 3], images=images if i % 2 else 0, seed=i)) for i in range(n)]


def test_collate_boundaries_labels_and_positions():
    samples = _encoded(4)
    batch = collate(samples)
    lengths = [s.num_tokens for s in samples]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert batch.max_seqlen == max(lengths)
    for i, s in enumerate(samples):
        start, end = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        assert torch.equal(batch.input_ids[start:end], torch.from_numpy(s.input_ids))
        assert (batch.sample_index[start:end] == i).all()
        assert batch.position_ids[:, start].tolist() == [0, 0, 0]  # positions restart per sample
        # The last token of a sample never learns its neighbour's first token.
        assert batch.labels[end - 1] == IGNORE_INDEX
    image_patches = (batch.image_grid_thw.prod(-1)).tolist()
    assert batch.vit_cu_seqlens.tolist() == [0, *np.cumsum(image_patches).tolist()]
    assert batch.pixel_values.shape[0] == sum(image_patches)
    assert [m["key"] for m in batch.meta] == ["s0", "s1", "s2", "s3"]


def test_packer_respects_both_budgets_and_keeps_every_sample():
    samples = _encoded(40)
    budget = max(s.num_tokens for s in samples) * 3
    vit_budget = max(s.num_patches for s in samples) * 2
    packer = Packer(PackConfig(llm_budget=budget, vit_budget=vit_budget, buffer_size=8))
    packs = [p for s in samples for p in packer.add(s)] + packer.flush()
    for pack in packs:
        assert sum(s.num_tokens for s in pack) <= budget
        assert sum(s.num_patches for s in pack) <= vit_budget
    keys = sorted(s.meta["key"] for pack in packs for s in pack)
    assert keys == sorted(s.meta["key"] for s in samples)


def test_packer_is_deterministic_and_fills_packs():
    def run():
        packer = Packer(PackConfig(llm_budget=400, vit_budget=10_000, buffer_size=16))
        samples = _encoded(60)
        return [[s.meta["key"] for s in p] for s in samples for p in packer.add(s)]

    first = run()
    assert first == run()
    assert len(first) >= 3


def test_oversized_sample_is_refused_with_a_reason():
    packer = Packer(PackConfig(llm_budget=10, vit_budget=10_000, buffer_size=4))
    with pytest.raises(SkipSample) as err:
        packer.add(_encoded(1)[0])
    assert err.value.reason == "too_long"
    packer = Packer(PackConfig(llm_budget=10_000, vit_budget=4, buffer_size=4))
    with pytest.raises(SkipSample) as err:
        packer.add(_encoded(2)[1])
    assert err.value.reason == "too_many_patches"
