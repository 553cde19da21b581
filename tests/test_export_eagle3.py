"""tools/export_eagle3.py and vlm_train.model.eagle3_export: a draft exported in SpecForge's published layout
(LlamaForCausalLMEagle3 config.json, the weight names SGLang and vLLM load) reads back to the same draft, giving
exactly the same training-time-test outputs and logits; clear errors for what cannot be exported or read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from vlm_train.cli.export_eagle3 import export, main
from vlm_train.model import VLM, ModelConfig
from vlm_train.model.draft import DraftShapeConfig, Eagle3Draft, draft_of
from vlm_train.model.eagle3_export import export_eagle3, load_eagle3_export
from vlm_train.train.builders import add_draft
from vlm_train.train.checkpoint import Checkpointer
from vlm_train.train.config import CheckpointConfig, Config, Eagle3Config

from helpers import encoder, flops_model_config, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The names SpecForge's LlamaForCausalLMEagle3 saves (specforge/modeling/draft/llama3_eagle.py) and its SGLang
# export keeps (specforge/export/to_sglang.py drops the embedding): what SGLang's and vLLM's loaders read.
PUBLISHED = {
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
}
VOCAB = 40
SHAPES = {
    "target_shape": DraftShapeConfig(draft_vocab_size=VOCAB),
    "own_shape": DraftShapeConfig(
        target_layers=[2, 0, 3], draft_vocab_size=VOCAB, num_kv_heads=4, intermediate_size=64
    ),
}


def _config() -> ModelConfig:
    """tests/helpers' small model with four decoder layers (three distinct ones to read)."""
    cfg = flops_model_config()
    cfg.llm.num_layers = 4
    return cfg


def _vlm(shape: DraftShapeConfig, seed: int = 0) -> VLM:
    """A tiny VLM with an attached draft whose every weight is random (norms too), the target's embedding, and a
    vocabulary of scattered target ids (so d2t holds real offsets)."""
    torch.manual_seed(seed)
    vlm = VLM(_config(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    add_draft(vlm, Eagle3Config(draft=shape))
    draft = draft_of(vlm)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        draft.embed_tokens.weight.copy_(vlm.llm.embed_tokens.weight)  # as the trainer does
    draft.set_vocabulary(torch.randperm(draft.t2d.numel())[:VOCAB])
    return vlm


def _outputs(draft: Eagle3Draft, seed: int = 1) -> list[torch.Tensor]:
    """TTT hidden states and logits of every step on a random pack of three samples (M-RoPE rows differ)."""
    generator = torch.Generator().manual_seed(seed)
    t, hidden = 23, draft.fc.in_features
    ids = torch.randint(0, draft.t2d.numel(), (t,), generator=generator)
    aux = torch.randn(t, hidden, generator=generator)
    positions = torch.stack([torch.arange(t), torch.arange(t) * 2 % 7, torch.arange(t) % 5])
    cu_seqlens = torch.tensor([0, 6, 15, t])
    with torch.no_grad():
        outs = draft.ttt(ids, aux, positions, cu_seqlens, steps=3)
        return [*outs, *(draft.logits(h) for h in outs)]


def _keys(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key).dtype for key in f.keys()}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_export_reads_back_to_the_same_draft(tmp_path, shape):
    vlm = _vlm(shape)
    draft = draft_of(vlm)
    folder = export_eagle3(draft, tmp_path / "eagle3")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = load_eagle3_export(folder, embed_tokens=vlm.llm.embed_tokens.weight)
    assert back.target_layers == draft.target_layers and back.draft_vocab_size == VOCAB
    assert torch.equal(back.d2t, draft.d2t) and torch.equal(back.t2d, draft.t2d)
    assert torch.equal(back.draft_to_target, draft.draft_to_target)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    for ours, theirs in zip(_outputs(draft), _outputs(back), strict=True):
        assert torch.equal(ours, theirs)  # float32 both ways: exactly the same numbers


def test_saved_names_and_config_are_the_published_layout(tmp_path):
    vlm = _vlm(SHAPES["own_shape"])
    draft = draft_of(vlm)
    folder = export_eagle3(draft, tmp_path / "eagle3")
    keys = _keys(folder / "model.safetensors")
    assert set(keys) == PUBLISHED  # no embed_tokens: the engines take the target's
    assert keys["d2t"] == torch.int64 and keys["t2d"] == torch.bool and keys["fc.weight"] == torch.float32
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    chosen = torch.arange(VOCAB) + d2t  # d2t as offsets: target id = draft id + d2t[id]
    assert chosen.tolist() == sorted(chosen.tolist()) and t2d[chosen].all() and int(t2d.sum()) == VOCAB
    config = json.loads((folder / "config.json").read_text())
    llm = vlm.cfg.llm
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["draft_vocab_size"] == VOCAB and config["vocab_size"] == llm.vocab_size
    assert config["hidden_size"] == config["target_hidden_size"] == llm.hidden_size
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": list(llm.mrope_section)}
    assert config["rope_theta"] == llm.rope_theta and config["head_dim"] == llm.resolved_head_dim
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 0, 3]  # SGLang's: layer outputs
    assert config["eagle_aux_hidden_state_layer_ids"] == [3, 1, 4]  # vLLM's: hidden-state boundaries
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 4, 64)
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"


def test_bfloat16_export_keeps_the_vocabulary_maps_and_an_embedding_on_request(tmp_path):
    vlm = _vlm(SHAPES["target_shape"])
    draft = draft_of(vlm)
    folder = export_eagle3(draft, tmp_path / "eagle3", dtype=torch.bfloat16, embed_tokens=True)
    keys = _keys(folder / "model.safetensors")
    assert set(keys) == PUBLISHED | {"embed_tokens.weight"}
    assert keys["fc.weight"] == keys["embed_tokens.weight"] == torch.bfloat16
    assert keys["d2t"] == torch.int64 and keys["t2d"] == torch.bool
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_eagle3_export(folder)  # self-contained: no embedding to pass
    assert torch.equal(back.d2t, draft.d2t) and torch.equal(back.t2d, draft.t2d)
    assert torch.equal(back.fc.weight, draft.fc.weight.to(torch.bfloat16).float())


def test_import_errors_name_what_to_fix(tmp_path):
    vlm = _vlm(SHAPES["target_shape"])
    folder = export_eagle3(draft_of(vlm), tmp_path / "eagle3")
    with pytest.raises(ValueError, match="embed_tokens"):
        load_eagle3_export(folder)  # neither in the folder nor passed
    config = json.loads((folder / "config.json").read_text())
    del config["eagle_config"]  # as some published drafts: the engines fall back to their default layers
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="target_layers"):
        load_eagle3_export(folder, embed_tokens=vlm.llm.embed_tokens.weight)
    layers = list(draft_of(vlm).target_layers)
    back = load_eagle3_export(folder, embed_tokens=vlm.llm.embed_tokens.weight, target_layers=layers)
    assert back.target_layers == tuple(layers)
    qwen = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl"}
    (folder / "config.json").write_text(json.dumps(qwen))
    with pytest.raises(ValueError, match="not an Eagle3 draft"):
        load_eagle3_export(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_eagle3_export(tmp_path / "nowhere")


def test_a_target_with_llama3_rope_cannot_be_exported(tmp_path):
    torch.manual_seed(0)
    cfg = _config()
    cfg.llm.rope_type = "llama3"
    cfg.llm.rope_scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64.0,
    }
    vlm = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    add_draft(vlm, Eagle3Config(draft=DraftShapeConfig(draft_vocab_size=VOCAB)))
    with pytest.raises(ValueError, match="rope_type=llama3"):
        export_eagle3(draft_of(vlm), tmp_path / "eagle3")


# ---- the tool on a checkpoint as the trainer writes it ------------------------------------------------------------


def _save_checkpoint(run: Path, vlm: VLM, shape: DraftShapeConfig) -> Path:
    """RUN/checkpoints/step_00000007 with model.safetensors, draft.safetensors, config.yaml (model and eagle3
    sections) and tokenizer/, saved by the trainer's Checkpointer."""
    config = Config(model=vlm.cfg, eagle3=Eagle3Config(draft=shape))
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    return Checkpointer(run, CheckpointConfig(keep_last=0)).save(7, vlm, config_yaml, tiny_tokenizer())


def test_tool_exports_the_newest_checkpoint_of_a_run(tmp_path):
    shape = SHAPES["own_shape"]
    vlm = _vlm(shape)
    checkpoint = _save_checkpoint(tmp_path / "run", vlm, shape)
    assert (checkpoint / "draft.safetensors").is_file()
    out = tmp_path / "served"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_eagle3.py"), str(tmp_path / "run"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    summary = json.loads(completed.stdout)
    assert summary["checkpoint"] == str(checkpoint) and summary["target_layers"] == [2, 0, 3]
    assert summary["files"] == ["config.json", "model.safetensors"] and summary["draft_vocab_size"] == VOCAB
    back = load_eagle3_export(out, embed_tokens=vlm.llm.embed_tokens.weight)
    for ours, theirs in zip(_outputs(draft_of(vlm)), _outputs(back), strict=True):
        assert torch.equal(ours, theirs)


def test_tool_in_process_with_dtype_and_embedding(tmp_path, capsys):
    shape = SHAPES["target_shape"]
    vlm = _vlm(shape, seed=3)
    checkpoint = _save_checkpoint(tmp_path / "run", vlm, shape)
    result = main([str(checkpoint), str(tmp_path / "served"), "--dtype", "bfloat16", "--embed-tokens"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["embed_tokens"] is True and result["target_num_layers"] == vlm.cfg.llm.num_layers
    assert isinstance(result["notes"], list)
    assert set(_keys(tmp_path / "served" / "model.safetensors")) == PUBLISHED | {"embed_tokens.weight"}


def test_tool_without_a_draft_says_to_train_one(tmp_path):
    torch.manual_seed(0)
    vlm = VLM(_config(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    checkpoint = Checkpointer(tmp_path / "run", CheckpointConfig(keep_last=0)).save(
        1, vlm, OmegaConf.to_yaml(OmegaConf.structured(Config(model=vlm.cfg)))
    )
    with pytest.raises(FileNotFoundError, match="curriculum=eagle3"):
        export(checkpoint, tmp_path / "served")
