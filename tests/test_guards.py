"""Guards: skipped steps (non-finite, loss spike) counted and limited, SIGTERM saves and exits 0, fault injection."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from vlm_train.train.config import GuardConfig
from vlm_train.train.guards import LOSS_SPIKE, NONFINITE_LOSS, Guard, SkipLimitError
from vlm_train.train.trainer import run

from conftest import SMALL_DATA, make_config

SHORT = [
    "curriculum.stages.0.steps=2",
    "curriculum.stages.1.steps=3",
    "eval.enabled=false",
    "logger.console_interval=100",
]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_guard_rules_and_state():
    guard = Guard(GuardConfig(spike_zscore=3.0, spike_window=4, spike_min_history=3, max_consecutive_skips=2))
    assert guard.check_loss(math.nan) == NONFINITE_LOSS and guard.check_loss(math.inf) == NONFINITE_LOSS
    for step, loss in enumerate([2.0, 2.1, 1.9], 1):
        assert guard.check_loss(loss) is None  # too little history for the spike rule yet
        guard.record(step, loss, None)
    assert guard.check_loss(2.05) is None and guard.check_loss(5.0) == LOSS_SPIKE
    copy = Guard(guard.cfg)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert copy.check_loss(5.0) == LOSS_SPIKE and list(copy.window) == [2.0, 2.1, 1.9]
    guard.record(4, 5.0, LOSS_SPIKE)
    guard.record(5, math.nan, NONFINITE_LOSS)
    assert guard.skipped == {LOSS_SPIKE: 1, NONFINITE_LOSS: 1} and list(guard.window) == [2.0, 2.1, 1.9]
    with pytest.raises(SkipLimitError, match="3 optimizer steps in a row.*max_consecutive_skips=2"):
        guard.record(6, math.nan, NONFINITE_LOSS)
    guard.record(7, 2.0, None)
    assert guard.consecutive == 0


def test_a_nan_step_is_skipped_counted_and_harmless(tmp_path):
    summary = run(make_config(f"run.dir={tmp_path}", *SHORT, "train.fault.nan_loss_at_steps=[3]"))
    rows = _rows(tmp_path)
    assert [r["skipped_step"] for r in rows] == [0, 0, 1, 0, 0]
    assert rows[2]["loss"] is None and rows[2]["skipped_steps/nonfinite_loss"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows[3:]) and summary["skipped_steps"] == 1


def test_an_inf_gradient_with_a_finite_loss_is_skipped(tmp_path):
    run(make_config(f"run.dir={tmp_path}", *SHORT, "train.fault.inf_grad_at_steps=[4]"))
    rows = _rows(tmp_path)
    assert [r["skipped_step"] for r in rows] == [0, 0, 0, 1, 0]
    assert math.isfinite(rows[3]["loss"]) and rows[3]["grad_norm"] is None  # inf is written as null
    assert rows[3]["skipped_steps/nonfinite_grad_norm"] == 1 and math.isfinite(rows[4]["loss"])


def test_a_run_of_skips_beyond_the_limit_stops_with_a_clear_error(tmp_path):
    cfg = make_config(
        f"run.dir={tmp_path}", *SHORT, "train.fault.nan_loss_at_steps=[2,3,4]", "train.guard.max_consecutive_skips=2"
    )
    with pytest.raises(SkipLimitError, match="max_consecutive_skips=2"):
        run(cfg)


def test_an_error_in_a_data_worker_stops_the_run_naming_it(tmp_path):
    cfg = make_config(f"run.dir={tmp_path}", *SHORT, "data.num_workers=1", "train.fault.data_error_at_pack=3")
    with pytest.raises(Exception, match="data_error_at_pack=3"):
        run(cfg)


def test_sigterm_saves_exits_zero_and_the_next_launch_resumes(tmp_path):
    """A real SIGTERM from outside, as SLURM sends it before preemption."""
    args = [
        *SMALL_DATA,
        f"run.dir={tmp_path}",
        "curriculum.stages.0.steps=2",
        "curriculum.stages.1.steps=500",
        "eval.enabled=false",
        "model.llm.num_layers=1",
    ]
    process = subprocess.Popen(["vlm-train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no 3 steps within 300 s: {process.communicate(timeout=30)[0][-3000:]}")
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=300)[0]
    finally:
        if process.poll() is None:
            process.kill()  # a failed assertion or a timeout leaves no training behind
            process.wait(timeout=30)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM" in output
    saved = json.loads(next((tmp_path / "checkpoints").glob("step_*/trainer_state.json")).read_text())["step"]
    assert saved >= 3 and len(_rows(tmp_path)) == saved
    resumed = subprocess.run(
        ["vlm-train", *args, f"train.exit_at_step={saved + 1}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, saved + 2))


def test_the_optimizer_is_torchs_fused_adamw_with_the_same_updates_and_still_skips():
    from vlm_train.train.config import TrainConfig
    from vlm_train.train.engines.base import make_optimizer

    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    reference = [w.detach().clone().requires_grad_(True) for w in weights]
    train = TrainConfig(weight_decay=0.1)
    fused = make_optimizer([{"params": weights, "weight_decay": 0.1}], train, clip=1.0)
    plain = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for group in fused.param_groups:
        group["lr"] = 1e-2
    for step in range(3):
        grads = [torch.randn_like(w) * 0.1 for w in weights]
        for w, r, g in zip(weights, reference, grads):
            w.grad, r.grad = g.clone(), g.clone()
        report = fused.step(skip=step == 1)  # the skipped step moves neither weights nor moments
        assert report.applied == (step != 1)
        if step != 1:
            plain.step()
    for w, r in zip(weights, reference):
        torch.testing.assert_close(w, r, rtol=1e-6, atol=1e-7)
