"""Exact resume: after an interruption the losses equal those of an uninterrupted run, bit for bit on CPU,
across a stage boundary: one process, and 2 ranks of DeepSpeed ZeRO-2 stopped by SIGTERM to one rank."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vlm_train.train.trainer import run

from conftest import SMALL_DATA, make_config

STAGES = [
    "curriculum.stages.0.steps=2",
    "curriculum.stages.1.steps=3",
    "eval.enabled=false",
    "logger.console_interval=100",
]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize("stop_at,workers", [(1, 0), (2, 1)], ids=["inside-stage", "at-stage-end-with-worker"])
def test_resumed_single_process_run_equals_an_uninterrupted_one(tmp_path, stop_at, workers):
    common = [*STAGES, f"data.num_workers={workers}", "train.guard.spike_zscore=50"]
    expected = losses(_run(tmp_path / "whole", common))
    stopped = run(
        make_config(
            f"run.dir={tmp_path / 'parts'}",
            *common,
            f"train.exit_at_step={stop_at}",
            "checkpoint.interval=1",
            "checkpoint.keep_last=1",
        )
    )
    assert stopped == {"steps": stop_at, "stopped": "exit_at_step"}
    checkpoint = tmp_path / "parts" / "checkpoints" / f"step_{stop_at:08d}"
    assert [p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()] == [checkpoint.name]  # keep_last=1
    for name in ("optimizer_rank00000.pt", "rng_rank00000.pt"):
        torch.load(checkpoint / name, weights_only=True)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["position"]["step"] == stop_at and len(state["guard"]["window"]) == stop_at
    assert json.loads((checkpoint / "loader_rank00000.json").read_text())["workers"] == max(workers, 1)
    resumed = losses(_run(tmp_path / "parts", common))
    assert resumed == expected and len(expected) == 5


def test_a_resume_into_a_curriculum_without_the_stage_it_stopped_in_is_a_clear_error(tmp_path):
    run(make_config(f"run.dir={tmp_path}", *STAGES, "train.exit_at_step=3"))  # stopped in stage 2
    cfg = make_config(f"run.dir={tmp_path}", *STAGES)
    cfg.curriculum.stages = cfg.curriculum.stages[:1]
    with pytest.raises(ValueError, match="checkpoint is in stage 2 .*'full'"):
        run(cfg)


def _run(run_dir, overrides):
    run(make_config(f"run.dir={run_dir}", *overrides))
    return run_dir


def _torchrun(*overrides: str, cwd=None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "vlm_train.train",
        *SMALL_DATA,
        *STAGES,
        "curriculum.stages.0.steps=3",
        "engine=deepspeed",
        "engine.zero_stage=2",
        "model.llm.num_layers=1",
        "model.vision.depth=1",
        "data.pack.llm_budget=512",
        # rank 0's gradient turns inf at step 4: DeepSpeed must skip that update on both ranks alike
        "train.fault.inf_grad_at_steps=[4]",
        "train.fault.inf_grad_rank=0",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.slow
def test_two_rank_zero2_run_stopped_by_sigterm_resumes_exactly(tmp_path):
    # The default run.dir, outputs/<time>: both ranks must name the same folder (rank 0's time).
    (tmp_path / "cwd").mkdir()
    whole = _torchrun(cwd=tmp_path / "cwd")
    assert whole.returncode == 0, whole.stderr[-4000:]
    folders = list((tmp_path / "cwd" / "outputs").iterdir())
    assert len(folders) == 1 and (folders[0] / "summary.json").is_file()
    # SIGTERM reaches rank 1 after step 1; the ranks agree at the next step's all-reduce, save step 2 (inside the
    # first stage, so its optimizer state must be restored) and exit 0; the resumed run crosses into stage 2.
    stopped = _torchrun(f"run.dir={tmp_path / 'parts'}", "train.fault.sigterm_at_step=1", "train.fault.sigterm_rank=1")
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    checkpoints = sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]
    folder = tmp_path / "parts" / "checkpoints" / "step_00000002"
    for rank in (0, 1):
        torch.load(folder / f"optimizer_rank{rank:05d}.pt", weights_only=True)
        assert json.loads((folder / f"loader_rank{rank:05d}.json").read_text())["rank"] == rank
    resumed = _torchrun(f"run.dir={tmp_path / 'parts'}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected = losses(folders[0])
    assert len(expected) == 6 and losses(tmp_path / "parts") == expected
    rows = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_step"] for r in rows] == [0, 0, 0, 1, 0, 0]
    assert rows[3]["skipped_steps/nonfinite_grad_norm"] == 1


def test_periodic_evaluation_changes_nothing_and_a_resumed_run_logs_the_same_figures(tmp_path):
    evals = ["eval.interval=2", "eval.at_stage_end=true", "eval.num_loss=8", "eval.num_caption=3"]
    evals += ["eval.num_grounding=3", "eval.max_new_tokens=6"]
    plain = losses(_run(tmp_path / "plain", STAGES))
    whole = _rows(_run(tmp_path / "whole", [*STAGES, *evals]))
    assert {r["step"]: r["loss"] for r in whole} == plain  # evaluating restores train mode and touches no state
    figures = {r["step"]: {k: v for k, v in r.items() if k.startswith("heldout_")} for r in whole}
    assert [step for step, f in figures.items() if f] == [2, 4, 5]  # every 2 steps, and at both stage ends
    assert all(f["heldout_exact_match_n"] == 3 and f["heldout_loss"] > 0 for f in figures.values() if f)
    stopped = run(
        make_config(f"run.dir={tmp_path / 'parts'}", *STAGES, *evals, "train.exit_at_step=3", "checkpoint.interval=1")
    )
    assert stopped["stopped"] == "exit_at_step"
    resumed = _rows(_run(tmp_path / "parts", [*STAGES, *evals]))
    assert {r["step"]: {k: v for k, v in r.items() if k.startswith("heldout_")} for r in resumed} == figures


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
