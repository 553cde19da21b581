"""tools/gpu_check.py runs end to end with tiny shapes on the CPU (the GPU run uses the same code at full size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((out / "gpu_check.json").read_text())
    assert report["tests"]["returncode"] == 0 and not report["tests"]["failed"]  # the CUDA tests skip here
    assert report["packs"]["count"] == 8 and 900 <= report["packs"]["tokens_mean"] <= 1024
    rows = {(r["backend"], r["activation_checkpointing"]): r for r in report["train"]}
    assert set(rows) == {("sdpa", False), ("sdpa", True)}  # the CUDA backends say why they cannot run
    assert set(report["backends_unavailable"]) == {"torch_varlen", "flash_attn"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["tflops_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["mfu"] is None  # no peak for a CPU
    assert report["fused_loss"] == {"available": False, "why": "it needs a CUDA device, got 'cpu'"}
    profile = report["profile"]
    assert Path(profile["file"]).read_text().count("\n") > 10 and profile["top"][0]["ms"] > 0
    deepspeed = report["deepspeed"]
    assert deepspeed["ok"] and deepspeed["steps"] == 6
    assert deepspeed["resume_max_abs_loss_diff"] == 0.0  # bit-exact on the CPU
