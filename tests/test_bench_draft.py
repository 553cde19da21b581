"""tools/bench_draft_step.py: its JSON, and that the padded reference computes what the packed draft step does
(the same hidden states and per-sample losses; a wrong reference is caught before timing). Never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tools.bench_draft_step as bench
from tools.bench_draft_step import BenchConfig, check_losses, main, new_draft_from, padded_ttt, prepare

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--rows", "3", "--steps", "1", "--repeats", "1", "--warmup", "1", "--max-words", "24", "--ttt-steps", "3"]
SMALL = BenchConfig(rows=3, steps=1, warmup=1, max_words=24, ttt_steps=3, device="cpu")


def test_padded_ttt_gives_each_samples_packed_hidden_states():
    data = prepare(SMALL, torch.device("cpu"))
    draft = new_draft_from(data, SMALL, torch.device("cpu"))
    packed, padded = data.packed[0], data.padded[0]
    assert padded.input_ids.shape[0] == SMALL.rows and int(padded.lengths.sum()) == packed.input_ids.numel()
    with torch.no_grad():
        ours = draft.ttt(packed.input_ids, packed.inputs.aux, packed.position_ids, packed.cu_seqlens, SMALL.ttt_steps)
        theirs = padded_ttt(draft, padded, SMALL.ttt_steps)
    bounds = packed.cu_seqlens.tolist()
    for step, (hidden, rows) in enumerate(zip(ours, theirs, strict=True)):
        for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            torch.testing.assert_close(rows[row, : b - a], hidden[a:b], atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_a_wrong_padded_reference_stops_the_benchmark(monkeypatch):
    data = prepare(SMALL, torch.device("cpu"))
    assert check_losses(SMALL, data, torch.device("cpu"))["matched"]
    right = bench.padded_ttt_attention

    def without_own_keys(q, keys, values, mask):  # attends to step 0's keys only: not the TTT mask
        return right(q, keys[:1], values[:1], mask)

    monkeypatch.setattr(bench, "padded_ttt_attention", without_own_keys)
    with pytest.raises(RuntimeError, match="differ"):
        check_losses(SMALL, data, torch.device("cpu"))


def test_bench_json(capsys):
    result = main([*FAST, "--device", "cpu", "--no-isolate"])
    assert json.loads(capsys.readouterr().out) == result
    assert {
        "config",
        "memory_method",
        "timed",
        "loss_check",
        "samples",
        "real_tokens",
        "padded_tokens",
        "real_token_fraction",
        "packed",
        "padded",
        "speedup",
        "memory_ratio",
        "first_loss_abs_diff",
        "draft_parameters",
        "device",
        "threads",
    } <= set(result)
    assert set(result["packed"]) == set(result["padded"]) == set(bench.FIGURES)
    check = result["loss_check"]
    assert check["matched"] and check["max_rel_diff"] <= check["tolerance_rel"]
    assert check["per_sample_step_losses"] == 2 * 3 * 3  # (warm-up + timed steps) x rows x TTT steps
    # Same draft weights, same samples and target features: the same loss, however the tokens are laid out.
    assert result["packed"]["first_loss"] == pytest.approx(result["padded"]["first_loss"], rel=1e-5)
    assert result["packed"]["last_loss"] == pytest.approx(result["padded"]["last_loss"], rel=1e-4)
    assert 0 < result["real_token_fraction"] <= 1 and result["padded_tokens"] >= result["real_tokens"] > 0
    assert result["config"]["ttt_steps"] == 3 and result["samples"] == 3


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_draft_step.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--ttt-steps" in result.stdout and "padded" in result.stdout
