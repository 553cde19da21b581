"""bf16 on the CPU (`engine.bf16=true`): torch's CPU autocast in the single engine. Slow there and not for speed: it
runs so that a dtype mistake in our bf16 path fails in CI rather than in the first GPU minutes. Each stage kind
(vlm, vision, draft) trains 20 steps in bf16, every loss finite and within 2e-2 (relative) of the fp32 run's, and
not equal to it (autocast was on); a bf16 run stopped and resumed gives the uninterrupted run's losses exactly. The
same for DeepSpeed ZeRO-2 on 2 ranks (its own bf16: bf16 weights, fp32 masters)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from vlm_train.train.trainer import run

from conftest import SHORT_RUN, SMALL_DATA, make_config

QUIET = ["eval.enabled=false", "logger.console_interval=100"]
RELATIVE = 2e-2


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def train(run_dir, *overrides: str) -> dict[int, float]:
    run(make_config(f"run.dir={run_dir}", *QUIET, *overrides))
    return losses(run_dir)


def assert_bf16_tracks_fp32(bf16: dict[int, float], fp32: dict[int, float], steps: int = 20) -> None:
    assert list(bf16) == list(fp32) and len(fp32) == steps
    for step, expected in fp32.items():
        assert math.isfinite(bf16[step]), f"step {step}: bf16 loss {bf16[step]}"
        assert abs(bf16[step] - expected) <= RELATIVE * abs(expected), f"step {step}: {bf16[step]} vs fp32 {expected}"
    assert bf16 != fp32  # the same to the last bit would mean bf16 never ran


VLM_STAGES = ["curriculum.stages.0.steps=5", "curriculum.stages.1.steps=15"]
VISION_STAGES = [
    "curriculum=vision_pretrain",
    "curriculum.stages.0.steps=8",  # vision: the tower alone, contrastive + multi-label
    "curriculum.stages.1.steps=4",  # align
    "curriculum.stages.2.steps=8",  # full
]


@pytest.mark.parametrize("stages", [VLM_STAGES, VISION_STAGES], ids=["vlm", "vision"])
def test_bf16_stages_track_fp32(tmp_path, stages):
    fp32 = train(tmp_path / "fp32", *stages)
    bf16 = train(tmp_path / "bf16", *stages, "engine.bf16=true")
    assert_bf16_tracks_fp32(bf16, fp32)


def test_a_bf16_draft_stage_tracks_fp32(tmp_path):
    target = tmp_path / "target"
    train(target, *SHORT_RUN, "model.llm.num_layers=3")
    draft = [
        "curriculum=eagle3",
        f"eagle3.target={target}",
        "eagle3.draft.draft_vocab_size=64",
        "eagle3.vocab_samples=50",
        "eagle3.ttt_steps=3",
        "curriculum.stages.0.steps=20",
    ]
    fp32 = train(tmp_path / "fp32", *draft)
    bf16 = train(tmp_path / "bf16", *draft, "engine.bf16=true")
    assert_bf16_tracks_fp32(bf16, fp32)


def test_a_bf16_run_resumes_exactly(tmp_path):
    common = [*VLM_STAGES, "engine.bf16=true", "checkpoint.interval=1", "checkpoint.keep_last=1"]
    whole = train(tmp_path / "whole", *common)
    stopped = run(make_config(f"run.dir={tmp_path / 'parts'}", *QUIET, *common, "train.exit_at_step=7"))
    assert stopped == {"steps": 7, "stopped": "exit_at_step"}
    assert train(tmp_path / "parts", *common) == whole and len(whole) == 20


# DeepSpeed's bf16 keeps bf16 weights beside fp32 masters: an update smaller than a weight's bf16 resolution reaches
# the forward only once the master has moved far enough (our reading), so the losses lag the fp32 run's most after
# a stage unfreezes the towers (Adam's first steps move every new weight by about the warm-up lr): 1.7e-2 at the second
# step of a 5-step align, 5.7e-3 after a 9-step one (and < 5e-3 at every other step).
DEEPSPEED = [
    *SMALL_DATA,
    "engine=deepspeed",
    "engine.zero_stage=2",
    "data.pack.llm_budget=512",
    "data.pack.vit_budget=2048",
    "curriculum.stages.0.steps=9",
    "curriculum.stages.1.steps=11",
    "checkpoint.interval=1",
    "checkpoint.keep_last=1",
    *QUIET,
]


def torchrun(run_dir, *overrides: str) -> dict[int, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vlm_train.train"]
    command += [f"run.dir={run_dir}", *DEEPSPEED, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run_dir)


@pytest.mark.slow
def test_deepspeed_zero2_on_two_ranks_in_bf16_tracks_fp32_and_resumes_exactly(tmp_path):
    fp32 = torchrun(tmp_path / "fp32")
    bf16 = torchrun(tmp_path / "bf16", "engine.bf16=true")
    assert_bf16_tracks_fp32(bf16, fp32)
    torchrun(tmp_path / "parts", "engine.bf16=true", "train.exit_at_step=12")
    assert len(losses(tmp_path / "parts")) == 12
    assert torchrun(tmp_path / "parts", "engine.bf16=true") == bf16
