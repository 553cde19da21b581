"""tools/gpu_check.py runs end to end with tiny shapes on the CPU (the GPU run uses the same code at full size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(
        # --bf16: the path a GPU runs (bf16 autocast; DeepSpeed's bf16 weights with fp32 masters), slowly
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--tiny", "--bf16"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((out / "gpu_check.json").read_text()) and report["bf16"] is True
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
    for engine in ("deepspeed", "fsdp2"):
        resumed = report[engine]
        assert resumed["ok"] and resumed["steps"] == 6, engine
        assert resumed["resume_max_abs_loss_diff"] == 0.0, engine  # bit-exact on the CPU
    assert report["fsdp2"]["last_tokens_per_s"] > 0


@pytest.mark.slow
def test_gpu_setup_runs_the_check_in_a_bare_venv_with_the_carried_wheels(tmp_path):
    """tools/gpu_setup.sh as on the lent GPU machine: a Python with only torch, transformers (with safetensors) and
    pytest, no av; the wheels fetched by `download-local` (the `download` list, for this interpreter); `run`
    installs them into $SITE and runs the check. Nothing is cached between runs: pip and torch's extension builds get
    fresh folders."""
    started = time.perf_counter()
    venv, wheels, site, out = tmp_path / "venv", tmp_path / "wheels", tmp_path / "site", tmp_path / "check"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
        VIRTUAL_ENV=str(venv),
        PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch-extensions"),  # DeepSpeed JIT-builds its CPU shm op here
        SITE=str(site),
        TMPDIR=str(tmp_path),
        WANDB_MODE="disabled",
    )
    setup = ["bash", str(ROOT / "tools" / "gpu_setup.sh")]
    # The download runs while the venv installs (they share nothing but the network).
    download = subprocess.Popen(
        [*setup, "download-local", str(wheels)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = ["torch==2.13.0", "transformers", "safetensors", "pytest"]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", *base]
    try:
        installed = subprocess.run(pip, env=env, capture_output=True, text=True, timeout=600)
        assert installed.returncode == 0, installed.stderr[-3000:]
        fetched = download.communicate(timeout=600)[0].decode()
    finally:  # a failed install or a timeout leaves no download running
        if download.poll() is None:
            download.kill()
            download.wait()
    assert download.returncode == 0, fetched[-3000:]
    prepared = time.perf_counter() - started

    result = subprocess.run(
        [*setup, "run", str(wheels), "--", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((out / "gpu_check.json").read_text())
    assert report["tests"]["returncode"] == 0 and report["tests"]["counts"].get("passed", 0) > 0
    assert [row["backend"] for row in report["train"]] == ["sdpa", "sdpa"]
    assert report["deepspeed"]["ok"] and report["deepspeed"]["resume_max_abs_loss_diff"] == 0.0
    assert report["fsdp2"]["ok"] and report["fsdp2"]["resume_max_abs_loss_diff"] == 0.0
    # The package ran from $SITE; pillow (which the venv lacks) came from if-missing/, numpy (which transformers
    # brought) was left to the venv; av was never installed.
    assert (site / "vlm_train" / "conf" / "config.yaml").is_file()
    assert list(site.glob("pillow-*.dist-info")) and not list(site.glob("numpy-*.dist-info"))
    assert not list(site.glob("av*")) and not list((venv / "lib").glob("python*/site-packages/av"))
    print(f"gpu_setup: venv and wheels {prepared:.0f} s, run {time.perf_counter() - started - prepared:.0f} s")
