import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import encoder, sample, tiny_tokenizer
from vlm_train.data.packer import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.train.checkpoint import complete_checkpoints, load_model_weights, save_checkpoint


def _model(seed=0):
    torch.manual_seed(seed)
    return VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)


def test_checkpoint_round_trip_without_pickle(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(collate([encoder().encode(sample("k", "a red circle"))])).logits.sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 7, model, optimizer, {"step": 7}, "a: 1\n", tiny_tokenizer(), keep_last=2)
    assert path.name == "step_00000007"
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 7}
    assert load_file(str(path / "model.safetensors"))
    other = _model(seed=1)
    load_model_weights(other, path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_keep_last_and_incomplete_saves_are_invisible(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, "", keep_last=2)
    (tmp_path / "checkpoints" / ".tmp-step_00000004").mkdir()  # a save killed half-way
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model(), None, {}, "", keep_last=1)
    cfg = ModelConfig()
    cfg.llm.num_layers = 1
    smaller = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    with pytest.raises((ValueError, RuntimeError), match="layers"):
        load_model_weights(smaller, path)
