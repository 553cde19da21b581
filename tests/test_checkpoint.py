"""The checkpoint component: parts register, checkpoints count only once complete, keep_last, the launch check,
weights-only checkpoints, and damaged files named with what to do."""

import enum
import json

import pytest
import torch
from safetensors.torch import load_file

from vlm_train.data.collate import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.train.checkpoint import (
    TRAINER_STATE,
    Checkpointer,
    CheckpointError,
    Launch,
    RandomState,
    complete_checkpoints,
    load_model_weights,
)
from vlm_train.train.config import CheckpointConfig
from vlm_train.train.engines import overlay, plain_state
from vlm_train.train.schedule import Position
from vlm_train.train.trainer import run

from conftest import make_config
from helpers import encoder, sample, tiny_tokenizer


def _model(seed=0):
    torch.manual_seed(seed)
    return VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)


class _OptimizerPart:
    """An optimizer as a per-rank tensors part, the way the engines save theirs."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self):
        return plain_state(self.optimizer.state_dict())

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(overlay(self.optimizer.state_dict(), state))


class _JsonPart:
    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state):
        self.value = state


def test_checkpoint_round_trip_without_pickle(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(collate([encoder().encode(sample("k", "a red circle"))])).logits.sum().backward()
    optimizer.step()
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_last=2))
    position = Position(step=7, stage=1, step_in_stage=3)
    checkpointer.register("position", position)
    checkpointer.register("optimizer", _OptimizerPart(optimizer), per_rank=True, tensors=True)
    checkpointer.register("rng", RandomState(), per_rank=True, tensors=True)
    checkpointer.register("loader", _JsonPart({"cursor": [1, 2]}), per_rank=True)
    path = checkpointer.save(7, model, "a: 1\n", tiny_tokenizer())
    assert path.name == "step_00000007"
    torch.load(path / "optimizer_rank00000.pt", weights_only=True)
    torch.load(path / "rng_rank00000.pt", weights_only=True)
    assert json.loads((path / "loader_rank00000.json").read_text()) == {"cursor": [1, 2]}
    state = json.loads((path / TRAINER_STATE).read_text())
    assert state["step"] == 7 and state["position"]["step_in_stage"] == 3 and state["world_size"] == 1
    assert load_file(str(path / "model.safetensors")) and (path / "config.yaml").read_text() == "a: 1\n"
    other = _model(seed=1)
    load_model_weights(other, path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name

    # A fresh set of parts gets the saved states back.
    fresh = Checkpointer(tmp_path)
    fresh_position, fresh_optimizer = Position(), torch.optim.AdamW(other.parameters(), lr=1e-3)
    loader = _JsonPart()
    fresh.register("position", fresh_position)
    fresh.register("optimizer", _OptimizerPart(fresh_optimizer), per_rank=True, tensors=True)
    fresh.register("rng", RandomState(), per_rank=True, tensors=True)
    fresh.register("loader", loader, per_rank=True)
    resume = fresh.resume_point("auto")
    assert resume is not None and resume.folder == path
    fresh.load(resume)
    assert fresh_position == position and loader.value == {"cursor": [1, 2]}
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and all(
        torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"]) for k in saved
    )
    with pytest.raises(ValueError, match="registered twice"):
        fresh.register("loader", loader, per_rank=True)


def test_keep_last_and_incomplete_saves_are_invisible(tmp_path):
    model = _model()
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_last=3))
    for step in (1, 2, 3, 10):
        checkpointer.save(step, model)
    (tmp_path / "checkpoints" / ".tmp-step_00000011").mkdir()  # a save killed half-way
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000010"]
    assert checkpointer.find("auto").name == "step_00000010"
    assert checkpointer.find("never") is None
    assert Checkpointer(tmp_path / "elsewhere").find("auto") is None
    assert checkpointer.find(str(tmp_path / "checkpoints" / "step_00000002")).name == "step_00000002"
    with pytest.raises(FileNotFoundError, match="train.resume"):
        checkpointer.find(str(tmp_path / "checkpoints" / ".tmp-step_00000011"))


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    path = Checkpointer(tmp_path, CheckpointConfig(keep_last=1)).save(1, _model())
    cfg = ModelConfig()
    cfg.llm.num_layers = 1
    smaller = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    with pytest.raises((ValueError, RuntimeError), match="layers"):
        load_model_weights(smaller, path)


def test_resume_checks_the_launch_and_takes_weights_only_checkpoints(tmp_path):
    ranks2 = Checkpointer(tmp_path / "run", launch=Launch(2, "deepspeed", 2))
    ranks2.register("position", Position(step=4))
    ranks2.save(4, _model())
    single = Checkpointer(tmp_path / "run", launch=Launch(1, "single"))
    with pytest.raises(ValueError, match="2 rank.*engine deepspeed ZeRO-2, but this launch has 1 rank.*engine single"):
        single.resume_point("auto")
    assert ranks2.resume_point("auto").state["step"] == 4
    # A checkpoint without training state (tools/convert_hf.py from-hf writes one) only initialises the weights.
    Checkpointer(tmp_path / "hf").save(0, _model(), info={"converted_from": "x"})
    resume = Checkpointer(tmp_path / "hf").resume_point("auto")
    assert resume is not None and resume.state is None


def test_damaged_checkpoint_files_are_named_with_what_to_do(tmp_path):
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_last=0))
    checkpointer.register("position", Position())
    checkpointer.register("optimizer", _JsonPart({"x": torch.ones(2)}), per_rank=True, tensors=True)
    checkpointer.register("loader", _JsonPart({"a": 1}), per_rank=True)
    for step in (1, 2):
        checkpointer.save(step, _model())
    newest = tmp_path / "checkpoints" / "step_00000002"
    for name in ("optimizer_rank00000.pt", "loader_rank00000.json"):
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])  # truncated, as by a full disk or a lost node
        with pytest.raises(CheckpointError, match=rf"{name} .*truncated or damaged.*train\.resume=.*step_00000001"):
            checkpointer.load(checkpointer.resume_point("auto"))
        (newest / name).write_bytes(data)
    (tmp_path / "checkpoints" / "step_00000001" / "loader_rank00000.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="no earlier complete checkpoint.*train.resume=never"):
        checkpointer.load(checkpointer.resume_point(str(tmp_path / "checkpoints" / "step_00000001")))


def test_a_truncated_model_file_stops_a_resumed_run_naming_it(tmp_path):
    """What a user meets after a crash mid-copy: the run names the file and the checkpoint to fall back to."""
    short = ["curriculum.stages.0.steps=2", "curriculum.stages.1.steps=3", "eval.enabled=false"]
    run(make_config(f"run.dir={tmp_path}", *short, "train.exit_at_step=3", "checkpoint.interval=1"))
    weights = tmp_path / "checkpoints" / "step_00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step_00000003/model\.safetensors .*train\.resume=.*step_00000002"):
        run(make_config(f"run.dir={tmp_path}", *short))


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
