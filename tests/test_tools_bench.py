"""tools/bench_step.py: its JSON, and that packed and padded steps compute the same thing (never timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_train.data.collate import collate
from vlm_train.data.encode import Encoder
from vlm_train.data.image import PatchSpec

from helpers import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
from tools.bench_step import BenchConfig, PaddedBatch, build_model, main, make_samples, padded_forward  # noqa: E402
from tools.bench_vision_stage import FIGURES as VISION_FIGURES  # noqa: E402
from tools.bench_vision_stage import main as vision_main  # noqa: E402

FAST = ["--rows", "3", "--steps", "2", "--repeats", "1", "--warmup", "1", "--max-words", "24", "--device", "cpu"]
FIGURES = {"tokens_per_s", "step_time_s", "pass_times_s", "peak_memory_mb", "first_loss", "last_loss"}


def _check_comparison(part: dict) -> None:
    assert {
        "real_tokens",
        "padded_tokens",
        "padded_over_real",
        "packed",
        "padded",
        "speedup",
        "memory_ratio",
        "first_loss_abs_diff",
        "parameters",
        "device",
        "threads",
    } <= set(part)
    assert set(part["packed"]) == set(part["padded"]) == FIGURES
    # Same samples, same initial weights: the same loss, however the tokens are laid out.
    assert part["packed"]["first_loss"] == pytest.approx(part["padded"]["first_loss"], rel=1e-5)
    assert part["packed"]["last_loss"] == pytest.approx(part["padded"]["last_loss"], rel=1e-3)
    assert part["padded_tokens"] >= part["real_tokens"] > 0


@pytest.mark.parametrize("equal", [False, True], ids=["padding", "equal_lengths"])
def test_packed_and_padded_forward_give_the_same_hidden_states(equal):
    tokenizer = tiny_tokenizer()
    encoder = Encoder(tokenizer, PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168))
    cfg = BenchConfig(rows=4, max_words=30)
    model = build_model(cfg, len(tokenizer), encoder.special.image_pad).eval()
    samples = make_samples(cfg, encoder, 4, equal=equal)
    assert (len({s.num_tokens for s in samples}) == 1) == equal  # padding, or none at all
    pack = collate(samples)
    padded = PaddedBatch.from_samples(samples, encoder.special.pad)
    with torch.no_grad():
        packed_hidden = model(pack, return_logits=False).hidden
        padded_hidden = padded_forward(model, padded).view(4, padded.input_ids.shape[1], -1)
    bounds = pack.cu_seqlens.tolist()
    for row, sample in enumerate(samples):
        torch.testing.assert_close(
            padded_hidden[row, : sample.num_tokens], packed_hidden[bounds[row] : bounds[row + 1]], atol=1e-5, rtol=1e-4
        )


def test_equal_length_samples_are_cut_to_one_length():
    encoder = Encoder(tiny_tokenizer(), PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168))
    samples = make_samples(BenchConfig(max_words=20), encoder, 5, equal=True)
    assert len({s.num_tokens for s in samples}) == 1
    with pytest.raises(ValueError, match="equal-tokens"):
        make_samples(BenchConfig(max_words=20, equal_tokens=4), encoder, 2, equal=True)  # would cut into the image


def test_bench_json_in_one_process(capsys):
    result = main([*FAST, "--no-isolate"])
    assert json.loads(capsys.readouterr().out) == result
    assert {
        "config",
        "memory_method",
        "cpu_count",
        "load_avg_before",
        "load_avg_after",
        "variable",
        "equal_length",
    } <= set(result)
    _check_comparison(result["variable"])
    _check_comparison(result["equal_length"])
    assert result["equal_length"]["padded_over_real"] == 1.0 and "overhead" in result["equal_length"]
    assert result["variable"]["padded_over_real"] > 1.0
    assert "one process" in result["memory_method"]


def test_bench_measures_cpu_memory_in_a_fresh_process_per_layout(capsys):
    result = main([*FAST, "--skip-equal"])
    assert "fresh process" in result["memory_method"] and "equal_length" not in result
    _check_comparison(result["variable"])
    # Optimizer state and activations alone make each layout's own peak grow (a child's figure is its own).
    assert result["variable"]["packed"]["peak_memory_mb"] > 0 and result["variable"]["padded"]["peak_memory_mb"] > 0


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_step.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--rows" in result.stdout and "padded" in result.stdout


VISION_FAST = ["--images", "6", "--steps", "1", "--repeats", "1", "--warmup", "0", "--max-side", "112"]


@pytest.mark.parametrize("pooling", ["map", "mean"])
def test_vision_stage_bench_packed_and_padded_give_the_same_loss(capsys, pooling):
    result = vision_main([*VISION_FAST, "--device", "cpu", "--pooling", pooling, "--no-isolate"])
    assert json.loads(capsys.readouterr().out) == result
    assert set(result["packed"]) == set(result["padded"]) == set(VISION_FIGURES)
    assert {"padded_over_real_patches", "speedup", "real_patches", "padded_patches", "memory_ratio"} <= set(result)
    assert result["config"]["pooling"] == pooling and result["images"] == 6
    # Same images, targets and initial weights: the same loss, whether the patches are packed or padded.
    assert result["packed"]["first_loss"] == pytest.approx(result["padded"]["first_loss"], rel=1e-4)
    assert result["padded_over_real_patches"] >= 1.0
    assert result["padded_patches"] >= result["real_patches"] > 0
