"""Model presets in conf/model: Qwen2.5-VL shapes with the released parameter counts, and ViT x LLM composition."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from vlm_train.model import VLM, DecoderLM

from conftest import make_config

# Parameter totals of the released checkpoints (vision tower + merger + LLM, tied weights counted once).
RELEASED = {"qwen2_5_vl_3b": 3_754_622_976, "qwen2_5_vl_7b": 8_292_166_656}


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_qwen2_5_vl_presets_have_the_released_parameter_count(preset):
    cfg = make_config(f"model={preset}").model
    assert cfg.vision.depth == 32 and cfg.vision.hidden_size == 1280 and cfg.vision.window_size == 112
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = VLM(cfg, vocab_size=cfg.llm.vocab_size, image_token_id=151655)
    assert model.num_parameters() == RELEASED[preset]


def test_any_vision_preset_composes_with_any_llm_preset():
    cfg = make_config("model=qwen2_5_vl_3b", "model/llm=qwen3_0_6b").model
    assert cfg.vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert cfg.llm.qk_norm and cfg.llm.head_dim == 128 and cfg.llm.hidden_size == 1024
    with torch.device("meta"):
        model = VLM(cfg, vocab_size=cfg.llm.vocab_size, image_token_id=151655)
    assert model.projector.mlp[-1].out_features == 1024  # the merger follows the chosen LLM's width


# Parameter totals of the released LLMs these presets copy.
RELEASED_LLM = {
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_0_6b": 596_049_920,
    "llama3_2_1b": 1_235_814_400,
}


@pytest.mark.parametrize("llm", sorted(RELEASED_LLM))
def test_every_llm_preset_has_its_released_parameter_count(llm):
    cfg = make_config("model=qwen2_5_vl_7b", f"model/llm={llm}").model
    cfg.validate()
    with torch.device("meta"):
        decoder = DecoderLM(cfg.llm)
    assert sum(p.numel() for p in decoder.parameters()) == RELEASED_LLM[llm]


def test_tiny_stays_the_default():
    cfg = make_config().model
    assert cfg.llm.vocab_size == 0 and cfg.vision.window_size == 0 and not cfg.init_from_hf


def test_cfg_job_shows_the_composed_model_without_building_it():
    result = subprocess.run(
        [sys.executable, "-m", "vlm_train.train", "model=qwen2_5_vl_7b", "model/llm=qwen2_5_3b", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = yaml.safe_load(result.stdout)["model"]
    assert model["vision"]["depth"] == 32 and model["llm"]["hidden_size"] == 2048
