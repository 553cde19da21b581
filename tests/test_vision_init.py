"""A vision tower from one checkpoint behind an LLM of another width: the tower loads, the merger starts fresh."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from vlm_train.data.collate import collate
from vlm_train.model import VLM, LLMConfig, ModelConfig
from vlm_train.model.hf import apply_hf_init, from_hf, load_vision_from_hf
from vlm_train.model.hf_weights import CheckpointMismatch, SafetensorsFolder
from vlm_train.train.builders import load_vision_from_checkpoint
from vlm_train.train.checkpoint import Checkpointer
from vlm_train.train.config import Config

from helpers import encoder, sample, tiny_tokenizer
from test_hf import VISION as HF_VISION

transformers = pytest.importorskip("transformers")

HF_TEXT_WIDTH = 64  # the merger of the checkpoint below writes 64-wide tokens
VISION = {**HF_VISION, "depth": 2}  # test_hf's tower, two blocks


@pytest.fixture(scope="module")
def hf_vl_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL (LLM and merger 64 wide), saved by transformers."""
    special = encoder().special
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tiny_tokenizer()),
            hidden_size=HF_TEXT_WIDTH,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(out_hidden_size=HF_TEXT_WIDTH, **VISION),
        image_token_id=special.image_pad,
        video_token_id=special.pad,
        vision_start_token_id=special.vision_start,
        vision_end_token_id=special.vision_end,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():  # HF one-inits norms and zero-inits biases: random values make every copy count
        for name, p in model.named_parameters():
            if "visual" in name and (name.endswith("bias") or "norm" in name or "ln_q" in name):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf_vl")
    model.save_pretrained(path)
    return path


def _model(hf_vl_dir, llm_width: int, **init) -> VLM:
    vision = from_hf(hf_vl_dir).cfg.vision
    heads = llm_width // 16  # head_dim 16 at every width, so one M-RoPE split fits all
    llm = LLMConfig(
        hidden_size=llm_width,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=2,
        intermediate_size=96,
        mrope_section=[2, 3, 3],
    )
    cfg = ModelConfig(vision=vision, llm=llm, attn_backend="sdpa", **init)
    torch.manual_seed(1)
    return VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)


def _batch():
    enc = encoder()
    return collate([enc.encode(sample(f"s{i}", "a red circle", images=n, seed=i)) for i, n in enumerate((1, 2))])


def _assert_tower_is_the_checkpoints(vlm: VLM, hf_vl_dir) -> None:
    stored = SafetensorsFolder(hf_vl_dir)
    hf_names = {k.removeprefix("model."): k for k in stored.keys()}  # transformers 5 writes model.visual.*
    for name, weight in vlm.vision.named_parameters():
        expected = stored.tensor(hf_names[f"visual.{name}"])
        assert torch.equal(weight.detach().flatten(), expected.flatten()), name  # the patch embedding is a Conv3d


def test_a_tower_behind_a_wider_llm_loads_and_the_merger_starts_fresh(hf_vl_dir, caplog):
    vlm = _model(hf_vl_dir, llm_width=96, init_vision_from_hf=str(hf_vl_dir))
    fresh = {name: p.detach().clone() for name, p in vlm.projector.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="vlm_train.model.hf"):
        apply_hf_init(vlm, vlm.cfg)
    _assert_tower_is_the_checkpoints(vlm, hf_vl_dir)
    for name, weight in vlm.projector.named_parameters():
        assert torch.equal(weight, fresh[name]), name
    assert vlm.projector.mlp[-1].weight.shape == (96, VISION["hidden_size"] * 4)
    assert "merger" in caplog.text and "64" in caplog.text and "96" in caplog.text
    with torch.no_grad():
        out = vlm(_batch())
    assert out.logits.shape[-1] == len(tiny_tokenizer()) and torch.isfinite(out.logits).all()


def test_a_tower_behind_an_llm_of_the_same_width_keeps_its_merger(hf_vl_dir):
    vlm = _model(hf_vl_dir, llm_width=HF_TEXT_WIDTH)
    load_vision_from_hf(vlm, hf_vl_dir)
    _assert_tower_is_the_checkpoints(vlm, hf_vl_dir)
    merger = from_hf(hf_vl_dir).projector
    for name, weight in vlm.projector.named_parameters():
        assert torch.equal(weight, merger.get_parameter(name)), name
    wider = _model(hf_vl_dir, llm_width=96)
    with pytest.raises(CheckpointMismatch, match=r"visual.merger.mlp.2.weight: checkpoint \[64, 128\], model \[96"):
        load_vision_from_hf(wider, hf_vl_dir, include_merger=True)  # asked for explicitly, it must fit


def test_our_checkpoints_tower_behind_a_wider_llm(hf_vl_dir, tmp_path):
    """model.init_vision_from copies vision.* only: the projector of a wider LLM keeps its own fresh weights."""
    source = _model(hf_vl_dir, llm_width=HF_TEXT_WIDTH)
    with torch.no_grad():
        for p in source.vision.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(Config(model=source.cfg)))
    folder = Checkpointer(tmp_path / "run").save(3, source, config_yaml, tiny_tokenizer())
    vlm = _model(hf_vl_dir, llm_width=96)
    fresh = {name: p.detach().clone() for name, p in vlm.projector.named_parameters()}
    load_vision_from_checkpoint(vlm, str(folder))
    for name, weight in vlm.vision.state_dict().items():
        assert torch.equal(weight, source.vision.state_dict()[name]), name
    for name, weight in vlm.projector.named_parameters():
        assert torch.equal(weight, fresh[name]), name
    with torch.no_grad():
        assert torch.isfinite(vlm(_batch()).logits).all()
