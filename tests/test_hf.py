"""Hugging Face interoperability: equal logits to transformers on import, export and LLM-only import; clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_train.data.collate import collate
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import normalise_patches
from vlm_train.model import VLM, LLMConfig, ModelConfig, VisionConfig
from vlm_train.model.hf import (
    UnsupportedCheckpoint,
    from_hf,
    llm_from_hf,
    load_llm_from_hf,
    load_vision_from_hf,
    to_hf,
)
from vlm_train.model.hf_weights import CheckpointMismatch
from vlm_train.model.vit import float_pixel_values

from helpers import encoder, noise_image, tiny_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)
VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
)


def _randomize(model, seed=0):
    """HF zero-inits biases and one-inits norms; random values make every mapped tensor count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return model


def _hf_vl_config(tie=True, vision=None):
    special = encoder().special
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tiny_tokenizer()),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            **TEXT,
        ),
        vision_config=dict(out_hidden_size=TEXT["hidden_size"], **(vision or VISION)),
        image_token_id=special.image_pad,
        video_token_id=special.pad,
        vision_start_token_id=special.vision_start,
        vision_end_token_id=special.vision_end,
        tie_word_embeddings=tie,
    )


@pytest.fixture(scope="module")
def hf_vl_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL with window attention, saved by transformers."""
    torch.manual_seed(0)
    model = _randomize(transformers.Qwen2_5_VLForConditionalGeneration(_hf_vl_config(tie=False))).eval()
    path = tmp_path_factory.mktemp("hf_vl")
    model.save_pretrained(path)
    return path


def _samples():
    """Samples with images of different sizes and aspect ratios (several windows each), and one text-only sample."""
    enc = encoder()

    def sample(key, sizes, prompt, answer):
        images = [noise_image(w, h, seed=i + 10 * len(key)) for i, (w, h) in enumerate(sizes)]
        turns = [Turn("user", IMAGE_PLACEHOLDER * len(images) + prompt), Turn("assistant", answer)]
        return enc.encode(Sample(key, "test", "caption", images, turns, {}))

    return [
        sample("a", [(168, 112)], "Describe the image.", "a red circle"),
        sample("text", [], "What comes after one?", "two"),
        sample("bb", [(56, 140), (112, 112)], "Compare them.", "a blue square and a green diamond"),
    ]


def _hf_logits(hf_model, encoded):
    ids = torch.from_numpy(encoded.input_ids)[None]
    kwargs = {}
    if encoded.image_grid_thw.shape[0]:
        # HF takes normalised float patches with the frame repeated; ours get the loader's uint8 (see _assert_pack...).
        kwargs = dict(
            pixel_values=torch.from_numpy(normalise_patches(encoded.pixel_values, 2)),
            image_grid_thw=torch.from_numpy(encoded.image_grid_thw),
            mm_token_type_ids=(ids == hf_model.config.image_token_id).int(),
        )
    with torch.no_grad():
        return hf_model(input_ids=ids, **kwargs).logits[0]


def _assert_pack_matches_hf(ours: VLM, hf_model):
    samples = _samples()
    batch = collate(samples)
    assert batch.pixel_values.dtype == torch.uint8  # the model normalises and repeats the frame itself
    with torch.no_grad():
        logits = ours(batch).logits
    bounds = batch.cu_seqlens.tolist()
    for i, encoded in enumerate(samples):
        expected = _hf_logits(hf_model, encoded)
        torch.testing.assert_close(
            logits[bounds[i] : bounds[i + 1]],
            expected,
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, key=encoded.meta["key"]: f"sample {key}: {m}",
        )


def _load_hf_vl(path):
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# ---------------------------------------------------------------- whole Qwen2.5-VL


def test_imported_qwen2_5_vl_gives_transformers_logits_on_a_pack(hf_vl_dir):
    ours = from_hf(hf_vl_dir, attn_backend="sdpa").eval()
    assert ours.cfg.vision.window_size == 56 and ours.cfg.vision.fullatt_block_indexes == [1]
    assert not ours.cfg.llm.tie_word_embeddings
    _assert_pack_matches_hf(ours, _load_hf_vl(hf_vl_dir))


def test_export_reloads_in_transformers_with_the_same_logits(tmp_path):
    # Our own random model: tied embeddings, no q/k/v bias (exported as exact zeros), window attention.
    cfg = ModelConfig(
        vision=VisionConfig(
            hidden_size=32,
            depth=3,
            num_heads=2,
            intermediate_size=48,
            window_size=56,
            fullatt_block_indexes=[2],
            initializer_range=0.07,
        ),
        llm=LLMConfig(
            mrope_section=[2, 3, 3],
            qkv_bias=False,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
        ),
        attn_backend="sdpa",
    )
    torch.manual_seed(1)
    ours = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad).eval()
    _randomize(ours, seed=1)
    out = to_hf(ours, tmp_path / "export", tokenizer=tiny_tokenizer())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and config["tie_word_embeddings"]
    assert (out / "tokenizer.json").is_file()
    reloaded = _load_hf_vl(out)
    assert reloaded.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert reloaded.config.vision_config.initializer_range == 0.07 == from_hf(out).cfg.vision.initializer_range
    _assert_pack_matches_hf(ours, reloaded)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|image_pad|>") == ours.image_token_id
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.merge_size == 2 and processor.patch_size == 14


def test_import_then_export_writes_the_same_tensors(hf_vl_dir, tmp_path):
    out = to_hf(from_hf(hf_vl_dir), tmp_path / "again", max_shard_size="100KB")  # forces several shards
    assert (out / "model.safetensors.index.json").is_file()
    original = load_file(str(hf_vl_dir / "model.safetensors"))
    written = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        written.update(load_file(str(shard)))
    assert written.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    # Sharded folders import too.
    again = from_hf(out)
    torch.testing.assert_close(
        again.vision.patch_embed.proj.weight.flatten(),
        original["visual.patch_embed.proj.weight"].flatten(),
        atol=0,
        rtol=0,
    )


def test_vision_tower_and_merger_only(hf_vl_dir):
    hf_model = _load_hf_vl(hf_vl_dir)
    # Another LLM (different depth) behind the same vision tower: only the vision config must match.
    vision = VisionConfig(
        hidden_size=32, depth=3, num_heads=2, intermediate_size=48, window_size=56, fullatt_block_indexes=[1]
    )
    cfg = ModelConfig(
        vision=vision, llm=LLMConfig(hidden_size=64, num_layers=1, mrope_section=[4, 2, 2]), attn_backend="sdpa"
    )
    ours = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad).eval()
    llm_before = ours.llm.layers[0].mlp.up_proj.weight.clone()
    load_vision_from_hf(ours, hf_vl_dir)
    batch = collate(_samples())
    with torch.no_grad():
        hf_pixels = float_pixel_values(batch.pixel_values, vision.patch_dim)
        expected = hf_model.model.visual(hf_pixels, grid_thw=batch.image_grid_thw).pooler_output
        got = ours.encode_images(batch.pixel_values, batch.image_grid_thw)  # uint8, as the loader gives
        from_float = ours.encode_images(hf_pixels, batch.image_grid_thw)  # float, as HF callers give
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # To rounding: the loader's one frame meets the kernel summed over time, HF's repeated frames the whole kernel.
    torch.testing.assert_close(from_float, got, atol=1e-6, rtol=1e-5)
    assert torch.equal(ours.llm.layers[0].mlp.up_proj.weight, llm_before)


# ---------------------------------------------------------------- LLM-only checkpoints

LLM_FAMILIES = {
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=120,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **TEXT,
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=120, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **TEXT)
    ),
    "llama3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=120,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            **TEXT,
        )
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=120, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **TEXT
        )
    ),
}


@pytest.fixture(scope="module", params=sorted(LLM_FAMILIES))
def hf_llm_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(LLM_FAMILIES[request.param]()).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def _text_pack(vocab, lengths=(9, 14, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return seqs, torch.cat(seqs), positions, cu


def test_llm_only_import_equals_transformers(hf_llm_dir):
    path, hf_model = hf_llm_dir
    llm = llm_from_hf(path, attn_backend="sdpa").eval()
    seqs, ids, positions, cu = _text_pack(120)
    with torch.no_grad():
        logits = llm(ids, positions, cu, int((cu[1:] - cu[:-1]).max()))
        bounds = cu.tolist()
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(
                logits[bounds[i] : bounds[i + 1]], hf_model(input_ids=seq[None]).logits[0], atol=1e-4, rtol=1e-4
            )


def test_llm_checkpoint_initialises_the_llm_of_a_vlm(hf_llm_dir):
    path, hf_model = hf_llm_dir
    theirs = llm_from_hf(path).cfg
    cfg = ModelConfig(vision=VisionConfig(hidden_size=32, num_heads=2), llm=theirs, attn_backend="sdpa")
    vlm = VLM(cfg, vocab_size=120, image_token_id=3).eval()
    load_llm_from_hf(vlm.llm, path)
    _, ids, positions, cu = _text_pack(120, lengths=(6, 11))
    ids[ids == 3] = 4  # no image-pad tokens in a text-only pack
    batch = collate_text(ids, positions, cu)
    with torch.no_grad():
        logits = vlm(batch).logits
        for i in range(2):
            seq = ids[cu[i] : cu[i + 1]]
            torch.testing.assert_close(
                logits[cu[i] : cu[i + 1]], hf_model(input_ids=seq[None]).logits[0], atol=1e-4, rtol=1e-4
            )


def collate_text(ids, positions, cu):
    from vlm_train.data.batch import PackedBatch

    lengths = (cu[1:] - cu[:-1]).long()
    return PackedBatch(
        input_ids=ids,
        labels=ids.clone(),
        position_ids=positions.expand(3, -1),
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()),
        sample_index=torch.repeat_interleave(torch.arange(len(lengths)), lengths),
        pixel_values=torch.zeros(0, VisionConfig().patch_dim),
        image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
        vit_cu_seqlens=torch.zeros(1, dtype=torch.int32),
        vit_max_seqlen=0,
    )


# ---------------------------------------------------------------- bad input


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedCheckpoint, match="gpt2.*qwen2_5_vl"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nowhere")


def test_llm_only_folder_is_not_a_vlm(hf_llm_dir):
    with pytest.raises(UnsupportedCheckpoint, match="qwen2_5_vl"):
        from_hf(hf_llm_dir[0])


def test_missing_and_unexpected_weights_are_listed(hf_vl_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_vl_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["visual.blocks.2.mlp.up_proj.weight"]
    state["visual.blocks.2.extra.weight"] = torch.zeros(3)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch) as error:
        from_hf(broken)
    message = str(error.value)
    assert "1 missing: visual.blocks.2.mlp.up_proj.weight" in message
    assert "1 unexpected: visual.blocks.2.extra.weight" in message


def test_shape_mismatch_is_listed_and_nothing_is_loaded(hf_vl_dir):
    theirs = from_hf(hf_vl_dir).cfg
    llm = LLMConfig(**{**theirs.llm.__dict__, "intermediate_size": 80})
    vlm = VLM(ModelConfig(vision=theirs.vision, llm=llm), vocab_size=llm.vocab_size, image_token_id=3)
    before = vlm.llm.embed_tokens.weight.clone()
    expected = r"model.layers.0.mlp.up_proj.weight: checkpoint \[96, 64\], model \[80, 64\]"
    with pytest.raises(CheckpointMismatch, match=expected):
        load_llm_from_hf(vlm.llm, hf_vl_dir)
    assert torch.equal(vlm.llm.embed_tokens.weight, before)


def test_settings_that_keep_shapes_are_still_checked(hf_vl_dir):
    theirs = from_hf(hf_vl_dir).cfg
    vision = VisionConfig(**{**theirs.vision.__dict__, "window_size": 0, "fullatt_block_indexes": []})
    llm = LLMConfig(**{**theirs.llm.__dict__, "rope_theta": 1e6})
    vlm = VLM(ModelConfig(vision=vision, llm=llm), vocab_size=llm.vocab_size, image_token_id=3)
    with pytest.raises(UnsupportedCheckpoint, match="window_size"):
        load_vision_from_hf(vlm, hf_vl_dir)
    with pytest.raises(UnsupportedCheckpoint, match="rope_theta: model has 1000000.0, checkpoint has 10000.0"):
        load_llm_from_hf(vlm.llm, hf_vl_dir)


def test_pickled_weights_are_refused(tmp_path, hf_vl_dir):
    shutil.copy(hf_vl_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled weights are never read"):
        from_hf(tmp_path)


def test_unsupported_llm_settings_are_named(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=50, attention_bias=True, **TEXT))
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="attention_bias"):
        llm_from_hf(tmp_path)


def test_export_refuses_what_qwen2_5_vl_cannot_express(tmp_path):
    cfg = ModelConfig(llm=LLMConfig(qk_norm=True))
    with pytest.raises(UnsupportedCheckpoint, match="qk_norm"):
        to_hf(VLM(cfg, vocab_size=64, image_token_id=3), tmp_path)


def test_config_fields_start_training_from_hf_weights(hf_vl_dir, tmp_path):
    from vlm_train.model.hf import apply_hf_init
    from vlm_train.model.hf_weights import SafetensorsFolder

    theirs = from_hf(hf_vl_dir).cfg
    stored = SafetensorsFolder(hf_vl_dir)
    for fields in (
        {"init_from_hf": str(hf_vl_dir)},
        {"init_llm_from_hf": str(hf_vl_dir), "init_vision_from_hf": str(hf_vl_dir)},
    ):
        cfg = ModelConfig(vision=theirs.vision, llm=theirs.llm, **fields)
        vlm = VLM(cfg, vocab_size=theirs.llm.vocab_size, image_token_id=encoder().special.image_pad)
        apply_hf_init(vlm, cfg)
        assert torch.equal(vlm.llm.lm_head.weight, stored.tensor("lm_head.weight"))
        assert torch.equal(vlm.projector.mlp[0].bias, stored.tensor("visual.merger.mlp.0.bias"))
        assert torch.equal(vlm.vision.blocks[2].attn.qkv.weight, stored.tensor("visual.blocks.2.attn.qkv.weight"))
    cfg = ModelConfig(vision=theirs.vision, llm=theirs.llm, init_from_hf=str(hf_vl_dir))
    other_pad = VLM(cfg, vocab_size=theirs.llm.vocab_size, image_token_id=encoder().special.image_pad + 1)
    with pytest.raises(UnsupportedCheckpoint, match="image_token_id"):
        apply_hf_init(other_pad, cfg)
