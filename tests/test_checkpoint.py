import enum
import json

import pytest
import torch
from safetensors.torch import load_file

from vlm_train.data.collate import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.train.checkpoint import TRAINER_STATE, complete_checkpoints, load_model_weights, save_checkpoint
from vlm_train.train.engine import overlay, plain_state
from vlm_train.train.resume import find_checkpoint, open_resume

from helpers import encoder, sample, tiny_tokenizer


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
    torch.load(path / "optimizer_rank00000.pt", weights_only=True)
    torch.load(path / "rng_rank00000.pt", weights_only=True)
    assert json.loads((path / TRAINER_STATE).read_text()) == {"step": 7}
    assert load_file(str(path / "model.safetensors"))
    other = _model(seed=1)
    load_model_weights(other, path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_keep_last_and_incomplete_saves_are_invisible(tmp_path):
    model = _model()
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, "", keep_last=3)
    (tmp_path / "checkpoints" / ".tmp-step_00000011").mkdir()  # a save killed half-way
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000010"]
    assert find_checkpoint(tmp_path, "auto").name == "step_00000010"
    assert find_checkpoint(tmp_path, "never") is None
    assert find_checkpoint(tmp_path / "elsewhere", "auto") is None
    assert find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step_00000002")).name == "step_00000002"
    with pytest.raises(FileNotFoundError, match="train.resume"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / ".tmp-step_00000011"))


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model(), None, {}, "", keep_last=1)
    cfg = ModelConfig()
    cfg.llm.num_layers = 1
    smaller = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    with pytest.raises((ValueError, RuntimeError), match="layers"):
        load_model_weights(smaller, path)


def test_resume_checks_the_launch_and_takes_weights_only_checkpoints(tmp_path):
    state = {"step": 4, "position": {"step": 4}, "world_size": 2, "engine": "deepspeed", "zero_stage": 2}
    save_checkpoint(tmp_path / "run", 4, _model(), None, state, "", keep_last=0)
    with pytest.raises(ValueError, match="2 rank.*deepspeed.*zero_stage=2.*1 rank"):
        open_resume(tmp_path / "run", "auto", 1, "single", 0)
    assert open_resume(tmp_path / "run", "auto", 2, "deepspeed", 2).state["step"] == 4
    # A checkpoint without training state (tools/convert_hf.py from-hf writes one) only initialises the weights.
    save_checkpoint(tmp_path / "hf", 0, _model(), None, {"step": 0, "converted_from": "x"}, "", keep_last=0)
    resume = open_resume(tmp_path / "hf", "auto", 1, "single", 0)
    assert resume is not None and resume.state is None


class _Stage(enum.IntEnum):
    two = 2


def test_optimizer_state_keeps_tensors_and_numbers_only(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "zero_stage": _Stage.two,
        "loss_scaler": object(),
        "groups": [{"lr": 0.1, "name": "llm", "params": [0]}],
        "pair": (1, object()),
    }
    plain = plain_state(state)
    assert set(plain) == {"state", "groups"} and plain["groups"][0]["name"] == "llm"
    live = {"zero_stage": _Stage.two, "state": {0: {"step": torch.tensor(0.0)}}, "groups": []}
    merged = overlay(live, plain)
    assert merged["zero_stage"] is _Stage.two and float(merged["state"][0]["step"]) == 3.0
    torch.save(plain, tmp_path / "o.pt")
    assert torch.load(tmp_path / "o.pt", weights_only=True)["groups"][0]["lr"] == 0.1
    with pytest.raises(Exception):  # noqa: B017 - the raw state would need unpickling; torch raises several types
        torch.save({"zero_stage": _Stage.two}, tmp_path / "raw.pt")
        torch.load(tmp_path / "raw.pt", weights_only=True)
