import json
import os
import subprocess
import sys

import pytest

from conftest import SMALL_DATA, make_config
from vlm_train.train.trainer import run


def test_a_short_run_lowers_the_loss(tmp_path):
    cfg = make_config(
        f"run.dir={tmp_path}",
        "curriculum.stages.0.steps=2",
        "curriculum.stages.1.steps=28",
        "curriculum.stages.1.warmup_steps=3",
        "eval.enabled=false",
        "logger.console_interval=100",
    )
    summary = run(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 30 and len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)


def test_single_engine_refuses_several_processes(tmp_path):
    cfg = make_config(f"run.dir={tmp_path}")
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(RuntimeError, match="one process"):
            run(cfg)
    finally:
        del os.environ["WORLD_SIZE"]


def test_torchrun_launches_the_module_entry_point(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "vlm_train.train",
               *SMALL_DATA, "curriculum.stages.0.steps=1", "curriculum.stages.1.steps=1", "eval.enabled=false",
               f"run.dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_the_default_run_completes_and_learns(tmp_path):
    """The README's main job, `vlm-train` with no arguments but the run folder, end to end."""
    result = subprocess.run(["vlm-train", f"run.dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(losses) == 840
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    assert summary["heldout_exact_match_n"] == 100 and summary["heldout_grounding_acc_n"] == 100
