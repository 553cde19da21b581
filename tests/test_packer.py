"""The Packer and collate: budgets, boundaries, positions, truncation, resumable state."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.collate import collate
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import ImageSampling
from vlm_train.data.packer import PackConfig, Packer, restore_key_of

from helpers import SPEC, encoder, noise_image, sample, tiny_tokenizer

WORDS = ["a red circle", "a blue square and a green diamond", "an orange triangle", "a small purple star " * 6]


def _sample(i: int, images: int | None = None):
    """Sample i of a varied stream: 0-3 images of different sizes, answers of different lengths."""
    return sample(f"s{i}", WORDS[i % 4], images=i % 4 if images is None else images, seed=i)


def _encoded(n: int, images: int | None = None):
    enc = encoder()
    return [enc.encode(_sample(i, images)) for i in range(n)]


def _stream(packer: Packer, samples) -> list[list]:
    return [pack for s in samples for pack in packer.add(s)] + packer.flush()


def _keys(packs) -> list[list[str]]:
    return [[s.meta["key"] for s in pack] for pack in packs]


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
        assert torch.equal(batch.position_ids[:, start:end], torch.from_numpy(s.position_ids))
        # Labels stay inside the sample: each target is the sample's own next token, the last predicts nothing.
        labels, ids = batch.labels[start:end], batch.input_ids[start:end]
        supervised = torch.nonzero(labels != IGNORE_INDEX).flatten()
        assert torch.equal(labels[supervised], ids[supervised + 1])
        assert labels[-1] == IGNORE_INDEX
    image_patches = (batch.image_grid_thw.prod(-1)).tolist()
    assert batch.vit_cu_seqlens.tolist() == [0, *np.cumsum(image_patches).tolist()]
    assert batch.pixel_values.shape[0] == sum(image_patches)
    assert [m["key"] for m in batch.meta] == ["s0", "s1", "s2", "s3"]
    # Raw uint8 pixels of one frame per patch, each sample's rows in order, unchanged by to().
    assert batch.pixel_values.dtype == torch.uint8 and batch.pixel_values.shape[1] == SPEC.pixel_dim
    assert torch.equal(batch.pixel_values, torch.from_numpy(np.concatenate([s.pixel_values for s in samples])))
    assert batch.to("cpu").pixel_values.dtype == torch.uint8


def test_collate_refuses_samples_with_different_pixel_layouts():
    with_image, text_only, other = _encoded(3, images=1)[0], _encoded(1, images=0)[0], _encoded(1, images=1)[0]
    assert collate([text_only]).pixel_values.shape == (0, SPEC.pixel_dim)
    text_only.pixel_values = np.zeros((0, SPEC.patch_dim), np.float32)  # an empty array of another layout is fine
    assert collate([with_image, text_only]).pixel_values.dtype == torch.uint8
    other.pixel_values = other.pixel_values.astype(np.float32)
    with pytest.raises(ValueError, match="differ in dtype or width"):
        collate([with_image, other])


def test_packed_mrope_positions_are_transformers_get_rope_index_per_sample():
    enc = encoder()
    packer = Packer(PackConfig(llm_budget=600, vit_budget=10_000, buffer_size=6))
    pack = next(p for p in _stream(packer, _encoded(12)) if sum(s.num_patches > 0 for s in p) >= 2)
    batch = collate(pack)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
            "vocab_size": len(tiny_tokenizer()),
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        },
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "out_hidden_size": 32},
        image_token_id=enc.special.image_pad,
        vision_start_token_id=enc.special.vision_start,
    )
    model = Qwen2_5_VLModel(config)
    images = 0
    for i, s in enumerate(pack):
        start, end = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        ids = batch.input_ids[start:end][None]
        grids = batch.image_grid_thw[images : images + s.image_grid_thw.shape[0]]
        images += s.image_grid_thw.shape[0]
        expected, _ = model.get_rope_index(ids, (ids == enc.special.image_pad).int(), image_grid_thw=grids)
        assert torch.equal(batch.position_ids[:, start:end], expected[:, 0])


def test_packer_respects_every_budget_and_keeps_every_sample():
    samples = _encoded(40)
    budget = max(s.num_tokens for s in samples) * 3
    vit_budget = max(s.num_patches for s in samples) * 2
    packer = Packer(PackConfig(llm_budget=budget, vit_budget=vit_budget, max_images=4, buffer_size=8))
    packs = _stream(packer, samples)
    for pack in packs:
        assert sum(s.num_tokens for s in pack) <= budget
        assert sum(s.num_patches for s in pack) <= vit_budget
        assert sum(s.image_grid_thw.shape[0] for s in pack) <= 4
    assert sorted(k for keys in _keys(packs) for k in keys) == sorted(s.meta["key"] for s in samples)
    assert max(sum(s.image_grid_thw.shape[0] for s in pack) for pack in packs) == 4  # the image budget binds


def test_packer_is_deterministic_mixes_the_stream_and_fills_packs():
    def run():
        packer = Packer(PackConfig(llm_budget=400, vit_budget=10_000, buffer_size=16))
        return [p for s in _encoded(60) for p in packer.add(s)]

    first = run()
    assert _keys(first) == _keys(run())
    assert len(first) >= 3
    fills = [sum(s.num_tokens for s in pack) / 400 for pack in first]
    assert np.mean(fills) > 0.95
    # Packs hold text-only and image samples together rather than one kind each.
    assert any(len({s.num_patches > 0 for s in pack}) == 2 for pack in first)


def test_oversized_samples_are_refused_with_a_reason_and_counted():
    packer = Packer(PackConfig(llm_budget=10, vit_budget=10_000, buffer_size=4))
    with pytest.raises(SkipSample) as err:
        packer.add(_encoded(1)[0])
    assert err.value.reason == "too_long"
    packer = Packer(PackConfig(llm_budget=10_000, vit_budget=4, buffer_size=4))
    with pytest.raises(SkipSample) as err:
        packer.add(_encoded(2)[1])
    assert err.value.reason == "too_many_patches"
    packer = Packer(PackConfig(llm_budget=10_000, vit_budget=10_000, max_images=2, buffer_size=4))
    with pytest.raises(SkipSample) as err:
        packer.add(_encoded(1, images=3)[0])
    assert err.value.reason == "too_many_images"
    assert dict(packer.counts) == {"dropped/too_many_images": 1}


@pytest.mark.parametrize("bad", [{"llm_budget": 0}, {"buffer_size": 0}, {"max_images": -1}, {"too_long": "cut"}])
def test_bad_pack_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="data.pack"):
        Packer(PackConfig(**bad))


def test_truncate_needs_the_special_tokens():
    with pytest.raises(ValueError, match="special=encoder.special"):
        Packer(PackConfig(too_long="truncate"))


def _conversation(key: str, turns: int = 3, seed: int = 0) -> Sample:
    """A multi-turn conversation with one image per user turn, each answered."""
    images = [noise_image(56 + 28 * (t % 2), 84, seed + t) for t in range(turns)]
    talk = [[Turn("user", IMAGE_PLACEHOLDER + "What is this?"), Turn("assistant", WORDS[t % 4])] for t in range(turns)]
    return Sample(key, "test", "conversation", images, [turn for pair in talk for turn in pair])


def test_truncation_cuts_text_at_the_end_and_images_whole():
    enc = encoder()
    full = enc.encode(_conversation("long", turns=3))
    ids = full.input_ids
    starts, ends = np.flatnonzero(ids == enc.special.vision_start), np.flatnonzero(ids == enc.special.vision_end) + 1
    spans = list(zip(starts, ends))
    cfg = PackConfig(vit_budget=10_000, too_long="truncate")
    kept_counts = set()
    for budget in range(1, full.num_tokens):  # every cut point: text, each image's run, its start and end tokens
        cfg.llm_budget = budget
        # The longest prefix within the budget that cuts no image: just before an image the budget falls inside.
        expected = next((int(start) for start, end in spans if start < budget < end), budget)
        try:
            cut = Packer(cfg, special=enc.special).check(full)
        except SkipSample as err:  # no supervised token left: nothing to learn
            assert err.reason == "too_long" and not (full.labels[: expected - 1] != IGNORE_INDEX).any()
            continue
        assert cut.num_tokens == expected and cut.meta["truncated_from"] == full.num_tokens
        assert np.array_equal(cut.input_ids, ids[:expected])
        assert np.array_equal(cut.position_ids, full.position_ids[:, :expected])
        assert np.array_equal(cut.labels[:-1], full.labels[: expected - 1]) and cut.labels[-1] == IGNORE_INDEX
        # Every kept image is whole, with its vision start and end, and has exactly its grid's patches.
        kept = cut.image_grid_thw.shape[0]
        kept_counts.add(kept)
        assert (cut.input_ids == enc.special.image_pad).sum() == cut.image_grid_thw.prod(-1).sum() // 4
        assert (cut.input_ids == enc.special.vision_start).sum() == kept
        assert (cut.input_ids == enc.special.vision_end).sum() == kept
        assert cut.num_patches == cut.image_grid_thw.prod(-1).sum()
        assert np.array_equal(cut.pixel_values, full.pixel_values[: cut.num_patches])
    assert kept_counts == {1, 2, 3}
    # Over the ViT budget: the images that do not fit go, with all the text from the first of them on.
    cfg.llm_budget, cfg.vit_budget = 10_000, int(full.image_grid_thw[:2].prod(-1).sum())
    cut = Packer(cfg, special=enc.special).check(full)
    assert cut.image_grid_thw.shape[0] == 2 and cut.num_tokens == spans[2][0]
    cfg.vit_budget, cfg.max_images = 10_000, 1
    assert Packer(cfg, special=enc.special).check(full).num_tokens == spans[1][0]


def test_truncated_pack_runs_through_the_model_and_is_counted():
    from vlm_train.model import VLM, ModelConfig

    enc = encoder()
    packer = Packer(PackConfig(llm_budget=120, vit_budget=10_000, buffer_size=2, too_long="truncate"), enc.special)
    samples = [enc.encode(sample(f"t{i}", "a blue square " * 30, images=2, seed=i)) for i in range(3)]
    packs = _stream(packer, samples)
    assert packer.counts["truncated"] >= 1
    model = VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=enc.special.image_pad).eval()
    with torch.no_grad():
        for pack in packs:
            batch = collate(pack)
            assert batch.num_tokens <= 120
            assert model(batch).logits.shape[0] == batch.num_tokens  # image pads and patches agree


def test_token_dropped_samples_truncate_and_collate_with_their_kept_patches():
    enc = Encoder(tiny_tokenizer(), SPEC, ImageSampling(drop_prob=1.0, drop_rate_min=0.25, drop_rate_max=0.5))
    rng = np.random.default_rng(0)
    samples = [enc.encode(_conversation(f"d{i}", turns=2, seed=i), rng=rng) for i in range(2)]
    assert all(s.num_patches < s.image_grid_thw.prod(-1).sum() for s in samples)
    with pytest.raises(ValueError, match="image_token_id"):
        collate(samples)
    batch = collate(samples, image_token_id=enc.special.image_pad)
    kept = (batch.vit_cu_seqlens[1:] - batch.vit_cu_seqlens[:-1]).tolist()
    is_pad = np.r_[0, batch.input_ids.numpy() == enc.special.image_pad, 0]
    pad_runs = np.diff(np.flatnonzero(np.diff(is_pad)))[::2]
    assert kept == (4 * pad_runs).tolist()
    assert batch.vit_cu_seqlens[-1] == batch.pixel_values.shape[0] == batch.patch_positions.shape[0]
    second_image = int(np.flatnonzero(samples[0].input_ids == enc.special.vision_start)[1])
    cfg = PackConfig(llm_budget=second_image + 3, vit_budget=10_000, too_long="truncate")
    cut = Packer(cfg, special=enc.special).check(samples[0])
    assert cut.num_tokens == second_image and cut.image_grid_thw.shape[0] == 1
    assert cut.num_patches == kept[0] == cut.patch_positions.shape[0]


def test_state_is_json_keys_and_a_restored_packer_continues_identically():
    enc = encoder()
    cfg = PackConfig(llm_budget=500, vit_budget=3000, buffer_size=10)
    stream = [_sample(i) for i in range(60)]
    by_key = {s.key: s for s in stream}

    uninterrupted = Packer(cfg)
    expected = _keys(_stream(uninterrupted, [enc.encode(s) for s in stream]))

    packer = Packer(cfg)
    before = [p for s in stream[:25] for p in packer.add(enc.encode(s))]
    state = json.loads(json.dumps(packer.state_dict()))  # plain JSON: keys, not tensors
    assert [k["key"] for k in state["buffer"]] == [s.meta["key"] for s in packer.buffer] and state["buffer"]
    restored = Packer(cfg)
    restored.load_state_dict(state, lambda key: enc.encode(by_key[key["key"]]))
    after = _stream(restored, [enc.encode(s) for s in stream[25:]])
    assert _keys(before) + _keys(after) == expected


def test_restore_key_prefers_the_loaders_key():
    encoded = _encoded(1)[0]
    assert restore_key_of(encoded) == {"source": "test", "key": "s0"}
    encoded.meta["restore_key"] = {"source": "web", "url": "a.tar", "index": 3}
    assert restore_key_of(encoded) == {"source": "web", "url": "a.tar", "index": 3}


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_a_packer_restored_under_lower_budgets_drops_or_cuts_what_no_longer_fits(too_long):
    """A curriculum stage lowered the budgets: buffered samples over them follow too_long, as new ones would."""
    enc = encoder()
    long_answers = [sample(f"long{i}", WORDS[3] * 2, images=i % 2, seed=i) for i in range(4)]  # these can be cut
    by_key = {s.key: s for s in [*(_sample(i) for i in range(12)), *long_answers]}
    big = Packer(PackConfig(llm_budget=1000, vit_budget=3000, buffer_size=20), enc.special)
    assert not [p for s in by_key.values() for p in big.add(enc.encode(s))]  # all still buffered
    state = json.loads(json.dumps(big.state_dict()))
    cfg = PackConfig(llm_budget=60, vit_budget=60, max_images=2, buffer_size=10, too_long=too_long)
    expected_drops, expected_kept = [], []
    for key in state["buffer"]:
        try:
            expected_kept.append(Packer(cfg, enc.special).check(enc.encode(by_key[key["key"]])))
        except SkipSample as err:
            expected_drops.append((key["key"], err.reason))
    small, dropped = Packer(cfg, enc.special), []
    small.load_state_dict(
        state, lambda key: enc.encode(by_key[key["key"]]), lambda k, e: dropped.append((k["key"], e.reason))
    )
    assert dropped == expected_drops and dropped
    assert small.counts == {f"dropped/{r}": n for r, n in Counter(r for _, r in dropped).items()}
    assert [s.meta["key"] for s in small.buffer] == [s.meta["key"] for s in expected_kept]
    cut = [s.meta["key"] for s in small.buffer if "truncated_from" in s.meta]
    assert bool(cut) == (too_long == "truncate")
    for pack in small.flush():
        assert sum(s.num_tokens for s in pack) <= 60 and sum(s.num_patches for s in pack) <= 60
        assert sum(s.image_grid_thw.shape[0] for s in pack) <= 2
