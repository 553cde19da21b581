"""The VLM over packed batches: shapes, packing exactness, dummy-image gradients, errors, HF equivalence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.model import VLM, LLMConfig, ModelConfig, VisionConfig
from vlm_train.model.llm import DecoderLM
from vlm_train.model.rope import inv_frequencies, mrope_cos_sin
from vlm_train.model.vit import float_pixel_values

VOCAB = 96
IMAGE_ID = 7
MERGE = 2


def tiny_config(**llm) -> ModelConfig:
    return ModelConfig(llm=LLMConfig(**llm), attn_backend="sdpa")


def make_model(cfg: ModelConfig | None = None, seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    return VLM(cfg or tiny_config(), vocab_size=VOCAB, image_token_id=IMAGE_ID).eval()


def make_sample(parts: list[tuple], seed: int, patch_dim: int = VisionConfig().patch_dim) -> dict:
    """One sample from ("text", n) / ("image", patch_rows, patch_cols) parts, positions as Qwen2-VL get_rope_index."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, pixels, grids = [], [], [], []
    start = 0
    for part in parts:
        if part[0] == "text":
            n = part[1]
            text = torch.randint(IMAGE_ID + 1, VOCAB, (n,), generator=g)
            ids.append(text)
            pos.append((start + torch.arange(n)).expand(3, n))
            start += n
        else:
            _, h, w = part
            gh, gw = h // MERGE, w // MERGE  # LLM tokens per image: one per merge window
            ids.append(torch.full((gh * gw,), IMAGE_ID))
            p = (
                torch.stack(
                    [
                        torch.zeros(gh * gw, dtype=torch.long),
                        torch.arange(gh).repeat_interleave(gw),
                        torch.arange(gw).repeat(gh),
                    ]
                )
                + start
            )
            pos.append(p)
            start = int(p.max()) + 1
            # Random patches stand in for the processor's merge-ordered patches; order does not matter here.
            pixels.append(torch.randn(h * w, patch_dim, generator=g))
            grids.append([1, h, w])
    return dict(input_ids=torch.cat(ids), position_ids=torch.cat(pos, dim=1), pixels=pixels, grids=grids)


def pack(samples: list[dict], patch_dim: int = VisionConfig().patch_dim) -> PackedBatch:
    """Concatenate samples into one PackedBatch (labels shifted within each sample)."""
    input_ids = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([torch.cat([s["input_ids"][1:], torch.tensor([IGNORE_INDEX])]) for s in samples])
    lengths = [len(s["input_ids"]) for s in samples]
    pixels = [p for s in samples for p in s["pixels"]]
    grids = torch.tensor([g for s in samples for g in s["grids"]], dtype=torch.long).reshape(-1, 3)
    image_sizes = grids.prod(-1)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=torch.cat([s["position_ids"] for s in samples], dim=1),
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32),
        max_seqlen=max(lengths),
        sample_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths)),
        pixel_values=torch.cat(pixels) if pixels else torch.zeros(0, patch_dim),
        image_grid_thw=grids,
        vit_cu_seqlens=torch.cat([torch.zeros(1), image_sizes.cumsum(0)]).to(torch.int32),
        vit_max_seqlen=int(image_sizes.max()) if len(grids) else 0,
    )


TEXT = [("text", 9)]
WITH_IMAGE = [("text", 3), ("image", 4, 6), ("text", 5)]
OTHER = [("text", 4), ("image", 2, 4), ("text", 6)]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(llm=LLMConfig(hidden_size=130)), "divisible"),
        (dict(llm=LLMConfig(num_kv_heads=3)), "multiple"),
        (dict(llm=LLMConfig(mrope_section=[4, 4, 4])), "mrope_section"),
        (dict(vision=VisionConfig(num_heads=3)), "vision"),
        (dict(attn_backend="xformers"), "attn_backend"),
        (dict(vision=VisionConfig(initializer_range=0.0)), "vision.initializer_range"),
        (dict(llm=LLMConfig(initializer_range=-0.1)), "llm.initializer_range"),
    ],
)
def test_config_validation_names_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(ModelConfig(), **change).validate()


def test_config_from_dict_rejects_unknown_keys():
    cfg = ModelConfig.from_dict({"llm": {"num_layers": 3}, "attn_backend": "sdpa"})
    assert cfg.llm.num_layers == 3 and cfg.vision == VisionConfig()
    with pytest.raises(ValueError, match="num_layer"):
        ModelConfig.from_dict({"llm": {"num_layer": 3}})


def test_vocab_size_comes_from_tokenizer_and_tied_params_count_once():
    model = make_model()
    assert model.llm.embed_tokens.num_embeddings == VOCAB
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with pytest.raises(ValueError, match="smaller"):
        VLM(tiny_config(vocab_size=VOCAB - 1), vocab_size=VOCAB, image_token_id=IMAGE_ID)


def test_each_tower_is_initialised_at_its_own_std():
    cfg = dataclasses.replace(tiny_config(initializer_range=0.02), vision=VisionConfig(initializer_range=0.1))
    model = make_model(cfg)

    def std_of(*modules):
        return torch.cat([m.weight.detach().flatten() for m in modules]).std().item()

    vision_linears = [
        m for m in [*model.vision.modules(), *model.projector.modules()] if isinstance(m, torch.nn.Linear)
    ]
    llm_linears = [m for m in model.llm.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert std_of(*vision_linears) == pytest.approx(0.1, rel=0.05)
    assert std_of(*llm_linears) == pytest.approx(0.02, rel=0.05)
    assert all(float(m.bias.abs().max()) == 0 for m in vision_linears if m.bias is not None)


# ---------------------------------------------------------------- forward


def test_output_shapes():
    model = make_model()
    batch = pack([make_sample(WITH_IMAGE, 1), make_sample(TEXT, 2)])
    out = model(batch)
    assert out.hidden.shape == (batch.num_tokens, 128)
    assert out.logits.shape == (batch.num_tokens, VOCAB)
    assert model(batch, return_logits=False).logits is None
    images = model.encode_images(batch.pixel_values, batch.image_grid_thw)
    assert images.shape == (24 // 4, 128)


@pytest.mark.parametrize("parts", [TEXT, WITH_IMAGE], ids=["text", "image"])
def test_sample_logits_do_not_depend_on_pack_neighbours(parts):
    model = make_model()
    sample, other = make_sample(parts, 1), make_sample(OTHER, 2)
    with torch.no_grad():
        alone = model(pack([sample])).logits
        behind = model(pack([other, sample])).logits
    n = len(other["input_ids"])
    torch.testing.assert_close(behind[n:], alone, atol=1e-5, rtol=0)


def test_vit_output_of_an_image_does_not_depend_on_other_images():
    model = make_model()
    a, b = make_sample([("image", 4, 6)], 1), make_sample([("image", 6, 2)], 2)
    with torch.no_grad():
        alone = model.vision(*_vit_inputs(pack([a])))
        packed = model.vision(*_vit_inputs(pack([b, a])))
    torch.testing.assert_close(packed[12:], alone, atol=1e-5, rtol=0)


def _vit_inputs(batch: PackedBatch):
    return batch.pixel_values, batch.image_grid_thw


def test_pack_without_images_gives_zero_grads_to_vision_and_projector():
    model = make_model().train()
    batch = pack([make_sample(TEXT, 1), make_sample([("text", 5)], 2)])
    logits = model(batch).logits
    loss = F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        if name.startswith(("vision.", "projector.")):
            assert torch.count_nonzero(p.grad) == 0, name
    assert model.llm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_image_token_count_mismatch_is_a_value_error():
    model = make_model()
    sample = make_sample(WITH_IMAGE, 1)
    sample["input_ids"] = torch.cat([sample["input_ids"], torch.tensor([IMAGE_ID])])
    sample["position_ids"] = torch.cat([sample["position_ids"], torch.full((3, 1), 99)], dim=1)
    with pytest.raises(ValueError, match="image-pad tokens"):
        model(pack([sample]))
    text = make_sample(TEXT, 2)
    text["input_ids"][0] = IMAGE_ID
    with pytest.raises(ValueError, match="no image patches"):
        model(pack([text]))


def test_loader_uint8_pixels_equal_their_normalised_float_patches():
    """One frame of raw uint8 per patch (the loader's layout) and HF's normalised float patches are the same input.

    Equal to rounding, not bitwise: one frame meets the kernel summed over time (PatchEmbed), the repeated frames
    the whole kernel."""
    vision = VisionConfig()
    g = torch.Generator().manual_seed(3)
    samples = [make_sample(WITH_IMAGE, 1), make_sample(OTHER, 2)]
    for s in samples:
        s["pixels"] = [
            torch.randint(0, 256, (p.shape[0], vision.patch_dim // 2), generator=g, dtype=torch.uint8)
            for p in s["pixels"]
        ]
    raw = pack(samples)
    expanded = dataclasses.replace(raw, pixel_values=float_pixel_values(raw.pixel_values, vision.patch_dim))
    model = make_model()
    with torch.no_grad():
        torch.testing.assert_close(model(raw).logits, model(expanded).logits, rtol=1e-5, atol=1e-5)
        # bf16 weights: normalised in float32 and cast after, as a float32 input is; the kernel summed over time
        # is rounded to bf16 once, so the two differ by bf16 rounding of features of magnitude ~0.2.
        model = model.to(torch.bfloat16)
        half = model.encode_images(raw.pixel_values, raw.image_grid_thw)
        assert half.dtype == torch.bfloat16
        full = model.encode_images(expanded.pixel_values, raw.image_grid_thw)
        torch.testing.assert_close(half.float(), full.float(), rtol=1.6e-2, atol=2e-3)


def test_pixel_values_of_another_layout_are_a_clear_error():
    model, grid, patch_dim = make_model(), torch.tensor([[1, 2, 2]]), VisionConfig().patch_dim
    with pytest.raises(ValueError, match=r"expected C\*p\*p = 588 \(one frame\)"):
        model.encode_images(torch.zeros(4, 100, dtype=torch.uint8), grid)
    with pytest.raises(ValueError, match="all t frames"):
        model.encode_images(torch.zeros(4, patch_dim // 2), grid)  # float patches of one frame
    with pytest.raises(ValueError, match=r"uint8 \(raw pixels\) or float"):
        model.encode_images(torch.zeros(4, patch_dim, dtype=torch.int64), grid)


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    batch = pack([make_sample(WITH_IMAGE, 1), make_sample(TEXT, 2)])
    results = []
    for checkpointing in (False, True):
        cfg = dataclasses.replace(tiny_config(), activation_checkpointing=checkpointing)
        model = make_model(cfg).train()
        loss = F.cross_entropy(model(batch).logits, batch.labels, ignore_index=IGNORE_INDEX)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_llm_with_qk_norm_untied_embeddings_and_explicit_head_dim():
    cfg = LLMConfig(
        vocab_size=VOCAB, qk_norm=True, qkv_bias=False, tie_word_embeddings=False, head_dim=48, mrope_section=[8, 8, 8]
    )
    llm = DecoderLM(cfg, attn_backend="sdpa")
    assert llm.lm_head.weight is not llm.embed_tokens.weight
    assert llm.layers[0].self_attn.q_norm.weight.shape == (48,)
    assert llm.layers[0].self_attn.q_proj.bias is None
    ids = torch.randint(0, VOCAB, (12,))
    logits = llm(ids, torch.arange(12), torch.tensor([0, 12], dtype=torch.int32), 12)
    assert logits.shape == (12, VOCAB) and torch.isfinite(logits).all()


def test_plain_positions_equal_three_equal_mrope_rows():
    inv_freq = inv_frequencies(32, 10000.0)
    pos = torch.arange(10)
    for a, b in zip(mrope_cos_sin(pos, inv_freq, [4, 6, 6]), mrope_cos_sin(pos.expand(3, -1), inv_freq, [4, 6, 6])):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- Hugging Face equivalence

transformers = pytest.importorskip("transformers")


def _load_hf_llm(ours: DecoderLM, hf_model) -> None:
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if ours.cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_tied", "qwen3"])
def test_decoder_matches_hf_logits(family):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=family == "qwen2_tied",
    )
    if family == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=48, **common))
        ours_cfg = LLMConfig(
            vocab_size=VOCAB,
            head_dim=48,
            mrope_section=[8, 8, 8],
            qkv_bias=False,
            qk_norm=True,
            tie_word_embeddings=False,
        )
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        ours_cfg = LLMConfig(vocab_size=VOCAB, tie_word_embeddings=family == "qwen2_tied")
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias mapping count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    ours = DecoderLM(ours_cfg, attn_backend="sdpa")
    _load_hf_llm(ours, hf)
    ids = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits[0]
        got = ours(ids[0], torch.arange(17), torch.tensor([0, 17], dtype=torch.int32), 17)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_mrope_matches_hf_qwen2_5_vl_rotary():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_vl

    text_cfg = hf_vl.Qwen2_5_VLTextConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    )
    position_ids = make_sample(WITH_IMAGE, 1)["position_ids"]
    x = torch.zeros(1, position_ids.shape[1], 128)
    hf_cos, hf_sin = hf_vl.Qwen2_5_VLRotaryEmbedding(text_cfg)(x, position_ids[:, None])
    cos, sin = mrope_cos_sin(position_ids, inv_frequencies(32, 10000.0), [4, 6, 6])
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=0)


def test_vision_tower_and_merger_match_hf_qwen2_5_vl():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_vl

    model = make_model()
    vcfg = model.cfg.vision
    hf_cfg = hf_vl.Qwen2_5_VLVisionConfig(
        depth=vcfg.depth,
        hidden_size=vcfg.hidden_size,
        num_heads=vcfg.num_heads,
        intermediate_size=vcfg.intermediate_size,
        out_hidden_size=128,
        patch_size=vcfg.patch_size,
        temporal_patch_size=vcfg.temporal_patch_size,
        in_channels=vcfg.in_channels,
        spatial_merge_size=vcfg.spatial_merge_size,
        window_size=56,
        fullatt_block_indexes=list(range(vcfg.depth)),  # windows off (tiny config): every block attends in full
    )
    hf_cfg._attn_implementation = "eager"
    hf = hf_vl.Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval()
    state = {}
    for k, v in model.vision.state_dict().items():
        state[k] = v.view(hf.patch_embed.proj.weight.shape) if k == "patch_embed.proj.weight" else v
    for k, v in model.projector.state_dict().items():
        state[f"merger.{k}"] = v
    hf.load_state_dict(state, strict=True)

    batch = pack([make_sample([("image", 4, 6)], 1), make_sample([("image", 8, 6)], 2)])
    with torch.no_grad():
        expected = hf(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output
        got = model.encode_images(*_vit_inputs(batch))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- window attention and token dropping

from vlm_train.model.vision_layout import pack_keep, random_keep, vision_layout  # noqa: E402


def _window_model(full_blocks: list[int], seed: int = 0) -> VLM:
    # Windows of 56 px = 2x2 merge units = 4x4 patches.
    vision = VisionConfig(
        hidden_size=32, depth=2, num_heads=2, intermediate_size=48, window_size=56, fullatt_block_indexes=full_blocks
    )
    return make_model(ModelConfig(vision=vision, llm=LLMConfig(), attn_backend="sdpa"), seed)


def test_window_layout_partitions_each_image_into_windows():
    grid = torch.tensor([[1, 8, 12], [1, 2, 6]])  # 4x6 units -> 2x3 windows of 4 units; 1x3 units -> 2 windows
    layout = vision_layout(grid, merge=2, window_units=2)
    assert layout.segment_lengths(windowed=False) == [96, 12]
    assert layout.segment_lengths(windowed=True) == [16] * 6 + [8, 4]
    assert sorted(layout.window_order.tolist()) == list(range(27))  # a permutation of all units
    # First window of the first image: units (0,0), (0,1), (1,0), (1,1) of its 4x6 unit grid.
    assert layout.window_order[:4].tolist() == [0, 1, 6, 7]


def test_windowed_blocks_keep_windows_independent():
    model = _window_model(full_blocks=[])  # every block windowed
    batch = pack([make_sample([("image", 8, 12)], 1)])
    pixels = batch.pixel_values.clone()
    with torch.no_grad():
        before = model.vision(pixels, batch.image_grid_thw)
        pixels[:4] += 1.0  # unit 0, which lies in window 0 with units 1, 6, 7
        after = model.vision(pixels, batch.image_grid_thw)
    changed = (after - before).abs().amax(-1).view(-1, 4).amax(-1) > 1e-6  # per unit
    assert changed.nonzero().squeeze(1).tolist() == [0, 1, 6, 7]


def test_token_dropping_skips_dropped_windows_and_accepts_full_or_kept_pixels():
    model = _window_model(full_blocks=[1])
    batch = pack([make_sample([("image", 8, 12)], 1), make_sample([("image", 4, 6)], 2)])
    keep = random_keep(batch.image_grid_thw, 2, drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (30,) and int(keep.sum()) == 15
    kept_pixels = batch.pixel_values[keep.repeat_interleave(4)]
    with torch.no_grad():
        from_all = model.encode_images(batch.pixel_values, batch.image_grid_thw, keep)
        from_kept = model.encode_images(kept_pixels, batch.image_grid_thw, keep)
        noisy = batch.pixel_values.clone()
        noisy[~keep.repeat_interleave(4)] = 100.0  # dropped patches must not matter
        from_noisy = model.encode_images(noisy, batch.image_grid_thw, keep)
        everything = model.encode_images(batch.pixel_values, batch.image_grid_thw, torch.ones(30, dtype=torch.bool))
        reference = model.encode_images(batch.pixel_values, batch.image_grid_thw)
    assert from_all.shape == (15, 128)
    torch.testing.assert_close(from_kept, from_all, atol=0, rtol=0)
    torch.testing.assert_close(from_noisy, from_all, atol=0, rtol=0)
    torch.testing.assert_close(everything, reference, atol=0, rtol=0)
    assert not torch.allclose(from_all, reference[keep], atol=1e-4)  # dropped patches were really left out
    with pytest.raises(ValueError, match="one flag per merge window"):
        model.encode_images(batch.pixel_values, batch.image_grid_thw, keep[:-1])
    with pytest.raises(ValueError, match="kept after token dropping"):
        model.encode_images(kept_pixels[4:], batch.image_grid_thw, keep)


def _dropping_pack(seed: int = 0):
    """A real pack from the data pipeline with half of each image's merge windows dropped, and the same undropped."""
    import numpy as np

    from vlm_train.data.collate import collate
    from vlm_train.data.encode import Encoder
    from vlm_train.data.image import ImageSampling

    from helpers import SPEC, sample, tiny_tokenizer

    sampling = ImageSampling(drop_prob=1.0, drop_rate_min=0.5, drop_rate_max=0.5)
    enc = Encoder(tiny_tokenizer(), SPEC, sampling)
    rng = np.random.default_rng(seed)
    samples = [sample(f"s{i}", "a red circle", images=n, seed=i) for i, n in enumerate((2, 0, 1))]
    dropped = collate([enc.encode(s, rng=rng) for s in samples], image_token_id=enc.special.image_pad)
    whole = collate([Encoder(tiny_tokenizer(), SPEC).encode(s) for s in samples])
    return dropped, whole, enc.special.image_pad


def test_packs_with_dropped_windows_run_and_ignore_what_was_dropped():
    batch, whole, image_pad = _dropping_pack()
    assert batch.patch_positions is not None
    vision = VisionConfig(
        hidden_size=32, depth=2, num_heads=2, intermediate_size=48, window_size=56, fullatt_block_indexes=[1]
    )
    torch.manual_seed(0)
    model = VLM(
        ModelConfig(vision=vision, attn_backend="sdpa"),
        vocab_size=int(batch.input_ids.max()) + 1,
        image_token_id=image_pad,
    ).eval()
    full = int(batch.image_grid_thw.prod(-1).sum())
    assert batch.num_patches < full and int((batch.input_ids == image_pad).sum()) * 4 == batch.num_patches
    keep = pack_keep(batch, 2)
    with torch.no_grad():
        logits = model(batch).logits
        direct = model.encode_images(batch.pixel_values, batch.image_grid_thw, keep)
    assert logits.shape == (batch.num_tokens, model.cfg.llm.vocab_size) and torch.isfinite(logits).all()
    assert direct.shape == (batch.num_patches // 4, 128)
    with torch.no_grad():  # the windows the mask names are the ones the data side kept
        from_whole = model.encode_images(whole.pixel_values, whole.image_grid_thw, keep)
    torch.testing.assert_close(from_whole, direct, atol=0, rtol=0)
    shuffled = batch.patch_positions.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]  # no longer merge order
    batch.patch_positions = shuffled
    with pytest.raises(ValueError, match="merge order"):
        model(batch)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_logits():
    batch = pack([make_sample(WITH_IMAGE, 1), make_sample(TEXT, 2)])
    eager = make_model()
    compiled = make_model(dataclasses.replace(tiny_config(), compile=True))
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch).logits, eager(batch).logits, atol=1e-5, rtol=1e-5)
