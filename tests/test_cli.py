"""The command line as a user runs it: `vlm-train` with Hydra overrides, in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import SHORT_RUN, SMALL_DATA


def vlm_train(*args: str, module: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vlm_train.train"] if module else ["vlm-train"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


def test_cli_trains_with_overrides_and_leaves_a_complete_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = vlm_train(*SMALL_DATA, *SHORT_RUN, f"run.dir={run_dir}", "model.llm.num_layers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "step 5/5" in log and "tok/s" in log and "eta" in log
    assert "Held-out examples" in log and "Held-out score" in log

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["llm"]["num_layers"] == 1 and "${" not in (run_dir / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in rows] == ["align"] * 2 + ["full"] * 3
    assert all(isinstance(r["loss"], float) for r in rows)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["final_loss"] == rows[-1]["loss"]
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0 and 0.0 <= summary["heldout_grounding_acc"] <= 1.0
    checkpoint = Path(summary["checkpoint"])
    assert load_file(str(checkpoint / "model.safetensors"))
    torch.load(checkpoint / "optimizer_rank00000.pt", weights_only=True)
    assert rows[0]["mfu"] is None and rows[0]["tflops_per_s"] > 0  # CPU: no peak to compare with


def test_module_entry_point_composes_the_same_config():
    result = vlm_train("--cfg", "job", "curriculum.stages.1.steps=50", "model=tiny", module=True)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["curriculum"]["stages"][1]["steps"] == 50
    assert config["model"]["llm"]["hidden_size"] > 0


def test_presets_and_engine_options_from_the_command_line():
    result = vlm_train(
        "--cfg",
        "job",
        "curriculum=internvl2_5",
        "curriculum.stages.2.lr_scale.vision=0.2",
        "curriculum.stages.0.loss.averaging=sample",
        "engine=deepspeed",
        "engine.zero_stage=3",
        "checkpoint.interval=100",
        "train.exit_at_step=50",
        "train.resume=never",
        "+curriculum.stages.1.data.mixture={shapes_caption: 0.7}",
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    stages = config["curriculum"]["stages"]
    assert [s["name"] for s in stages] == ["mlp_warmup", "vit_incremental", "full"]
    assert stages[2]["lr_scale"]["vision"] == 0.2 and stages[0]["loss"]["averaging"] == "sample"
    assert stages[1]["data"]["mixture"] == {"shapes_caption": 0.7}
    assert config["engine"]["name"] == "deepspeed" and config["engine"]["zero_stage"] == 3
    assert config["checkpoint"]["interval"] == 100 and config["train"]["exit_at_step"] == 50


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.llm.hiden_size=64", "hiden_size"),  # misspelt key
        ("train.grad_clip=abc", "grad_clip"),  # wrong type
        ("model=huge", "huge"),  # unknown config option
        ("curriculum.stages.0.stepz=3", "stepz"),  # misspelt key inside a list element
    ],
)
def test_bad_override_is_a_clear_error_naming_the_key(override, expected):
    result = vlm_train(override, "--cfg", "job")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_wandb_logger_writes_an_offline_run_and_never_the_api_key(tmp_path):
    run_dir = tmp_path / "run"
    secret = "0123456789abcdef0123456789abcdef01234567"  # a 40-character key, as W&B's are
    result = vlm_train(
        *SMALL_DATA,
        *SHORT_RUN,
        f"run.dir={run_dir}",
        "logger=wandb",
        "eval.enabled=false",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": secret},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    events = list(runs[0].glob("run-*.wandb"))
    assert events, "no W&B event file"
    # Offline runs keep history and summary as protobuf records; their keys appear verbatim in the file.
    data = events[0].read_bytes()
    for key in (
        b"tokens_per_s",
        b"grad_norm",
        b"loss/task/caption",
        b"final_loss",
        b"vlm_train",
        b"lr/llm",
        b"packing/llm_fill",
        b"tflops_per_s",
        b"skipped_steps",
    ):
        assert key in data, key
    # The key comes from the environment only: no config, log, metric, checkpoint or W&B file holds it.
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked and secret not in result.stdout + result.stderr
