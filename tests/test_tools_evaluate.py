"""Held-out evaluation: loss per source and task, caption / grounding scores, the periodic evaluator, the tool."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_train.data.collate import collate
from vlm_train.data.loader import iter_samples
from vlm_train.train import loss as L
from vlm_train.train.builders import build_data, build_model
from vlm_train.train.config import EvalConfig
from vlm_train.train.evaluator import HeldoutEvaluator

from conftest import make_config
from helpers import encoder
from tools_helpers import save_run, small_model, write_shard

ROOT = Path(__file__).resolve().parents[1]
from vlm_train.cli.evaluate import main  # noqa: E402

MAX_DECODE = 1 << 26
CAPTIONS = ["a red square", "two blue rings on the left", "a cross", "a small yellow triangle"]
BOXES = [("red square", [0.1, 0.2, 0.5, 0.6]), ("blue ring", [0.5, 0.5, 0.9, 0.8])]


@pytest.fixture(scope="module")
def model():
    return small_model(seed=1)


@pytest.fixture()
def shards(tmp_path):
    return (
        write_shard(tmp_path / "a.tar", CAPTIONS, BOXES, seed=0),
        write_shard(tmp_path / "b.tar", CAPTIONS[:2], BOXES[:1], seed=50),
    )


def test_heldout_loss_is_the_token_mean_per_source_and_task(model, shards):
    enc = encoder()
    evaluator = HeldoutEvaluator(
        {"a": [shards[0]], "b": [shards[1]]},
        enc,
        EvalConfig(num_caption=0, num_grounding=0, num_loss=5, tokens_per_pack=200),
        MAX_DECODE,
    )
    metrics = evaluator(model, torch.device("cpu"))
    assert len(evaluator.loss_packs()) > 1  # several packs, each with several samples

    sums: dict[str, list[float]] = {}
    for name, url in (("a", shards[0]), ("b", shards[1])):
        for sample in list(iter_samples([url], name, MAX_DECODE))[:5]:
            pack = collate([enc.encode(sample)])  # each sample alone
            with torch.no_grad():
                hidden = model(pack, return_logits=False).hidden
                losses = L.token_cross_entropy(hidden, pack.labels, head=model.llm.lm_head)
            supervised = int((pack.labels != -100).sum())
            for key in ("all", f"source/{name}", f"task/{sample.task}"):
                total, count = sums.setdefault(key, [0.0, 0])
                sums[key] = [total + float(losses.sum()), count + supervised]
    expected = {("heldout_loss" if k == "all" else f"heldout_loss/{k}"): t / n for k, (t, n) in sums.items()}
    assert set(expected) == {
        "heldout_loss",
        "heldout_loss/source/a",
        "heldout_loss/source/b",
        "heldout_loss/task/caption",
        "heldout_loss/task/grounding",
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    assert metrics["heldout_loss_tokens"] == sums["all"][1]


def test_caption_exact_match_counts_answers_equal_to_the_reference(model, tmp_path):
    """Captions set to the model's own answers score 1, another caption 0: 2 of 3 exactly."""
    cfg = EvalConfig(num_caption=3, num_grounding=2, max_new_tokens=6, prompts_per_pack=2, num_loss=0)
    first = HeldoutEvaluator(
        [write_shard(tmp_path / "x.tar", CAPTIONS[:3], BOXES)], encoder(), cfg, MAX_DECODE
    ).evaluate(model, torch.device("cpu"))
    answers = [p.generated for p in first.predictions if p.task == "caption"]
    assert len(answers) == 3 and all(answers) and len(set(answers)) == 3
    # The same images (same seeds), now captioned with the first two answers.
    shard = write_shard(tmp_path / "y.tar", [answers[0], answers[1], "not what it says"], BOXES)
    result = HeldoutEvaluator([shard], encoder(), cfg, MAX_DECODE).evaluate(model, torch.device("cpu"))
    metrics = result.metrics
    assert metrics["heldout_exact_match"] == pytest.approx(2 / 3) and metrics["heldout_exact_match_n"] == 3
    assert metrics["heldout_grounding_acc_n"] == 2 and 0 <= metrics["heldout_grounding_acc"] <= 1
    assert [p.correct for p in result.predictions if p.task == "caption"] == [True, True, False]
    assert "heldout_loss" not in metrics  # num_loss=0: no loss pass


def test_periodic_evaluator_from_the_trainer_setup(tmp_path):
    """What the trainer calls every few steps: samples read once, mode kept, same figures for the same weights."""
    cfg = make_config("eval.num_caption=2", "eval.num_grounding=2", "eval.max_new_tokens=4", "eval.num_loss=6")
    setup = build_data(cfg.data, cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, setup).train()
    evaluator = HeldoutEvaluator.from_setup(setup, cfg.eval, cfg.data.image.max_decode_pixels)
    first = evaluator(model, torch.device("cpu"))
    assert model.training
    assert first["heldout_exact_match_n"] == 2 and first["heldout_grounding_acc_n"] == 2
    assert math.isfinite(first["heldout_loss"]) and first["heldout_loss/source/heldout"] == first["heldout_loss"]
    assert set(first) >= {"heldout_loss/task/caption", "heldout_loss/task/grounding", "heldout_skipped"}
    assert evaluator(model, torch.device("cpu")) == first


def test_evaluate_tool_on_a_checkpoint(model, shards, tmp_path, capsys):
    save_run(tmp_path / "run", model, heldout_urls=shards[0])
    predictions = tmp_path / "predictions.jsonl"
    args = ["--num-loss", "4", "--num-caption", "2", "--num-grounding", "2", "--max-new-tokens", "4", "--device", "cpu"]
    summary = main([str(tmp_path / "run"), *args, "--predictions", str(predictions)])
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["sets"] == {"heldout": 1} and summary["checkpoint"].endswith("step_00000005")
    assert summary["heldout_exact_match_n"] == 2 and summary["heldout_grounding_acc_n"] == 2
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [p["task"] for p in lines] == ["caption", "caption", "grounding", "grounding"]
    assert lines[0]["expected"] == CAPTIONS[0]

    named = main([str(tmp_path / "run"), *args, "--heldout", f"a={shards[0]}", "--heldout", f"b={shards[1]}"])
    assert named["sets"] == {"a": 1, "b": 1}
    assert {"heldout_loss/source/a", "heldout_loss/source/b"} <= set(named)
    assert named["heldout_loss/source/a"] == pytest.approx(summary["heldout_loss"], rel=1e-5)


def test_evaluate_tool_errors_name_the_problem(model, shards, tmp_path):
    save_run(tmp_path / "run", model)  # its config names no held-out shards
    with pytest.raises(ValueError, match="pass --heldout"):
        main([str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        main([str(tmp_path / "run"), "--heldout", str(tmp_path / "missing.tar")])
    with pytest.raises(ValueError, match="given twice"):
        main([str(tmp_path / "run"), "--heldout", f"a={shards[0]}", "--heldout", f"a={shards[1]}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "no-run"), "--heldout", shards[0]])


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--heldout" in result.stdout and "--num-grounding" in result.stdout
