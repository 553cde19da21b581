"""Hydra sweeps (`vlm-train -m`): every job trains in a folder of its own, as Hydra lays sweeps out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_DATA

# Two stages of one step each and a tiny evaluation: a job is mostly start-up.
TINY_RUN = [
    *SMALL_DATA,
    "curriculum.stages.0.steps=1",
    "curriculum.stages.1.steps=1",
    "eval.num_loss=4",
    "eval.num_caption=2",
    "eval.num_grounding=2",
    "eval.max_new_tokens=4",
    "model.llm.num_layers=1",
]


def sweep(cwd: Path, *args: str, ranks: int = 0) -> subprocess.CompletedProcess:
    """`python -m vlm_train.train -m ARGS` in `cwd`; under torchrun with `ranks` processes when given."""
    torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}"] if ranks else []
    return subprocess.run(
        [sys.executable, *torchrun, "-m", "vlm_train.train", "-m", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def assert_trained(folder: Path, seed: int) -> None:
    """A complete run of two steps with its own config, metrics, checkpoint and summary."""
    assert yaml.safe_load((folder / "config.yaml").read_text())["run"]["seed"] == seed
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 2
    assert Path(summary["checkpoint"]).resolve().parent == (folder / "checkpoints").resolve()
    assert (Path(summary["checkpoint"]) / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_sweep_trains_each_job_in_its_own_folder_of_the_sweep_dir(tmp_path):
    """`vlm-train -m run.seed=0,1`: multirun/<time>/0 and multirun/<time>/1, each a fresh run with its own seed (they
    used to share outputs/<time>, and job 1 resumed job 0's checkpoint)."""
    result = sweep(tmp_path, "run.seed=0,1", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    for job, seed in ((0, 0), (1, 1)):
        assert_trained(sweeps[0] / str(job), seed)
    assert not (tmp_path / "outputs").exists()
    assert "resuming" not in result.stderr


def test_a_sweep_with_an_explicit_run_dir_puts_each_job_in_a_subfolder(tmp_path):
    result = sweep(tmp_path, "run.seed=3,4", f"run.dir={tmp_path / 'exp'}", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained(tmp_path / "exp" / "0", 3)
    assert_trained(tmp_path / "exp" / "1", 4)
    assert not (tmp_path / "exp" / "summary.json").exists()
    # Hydra's record of the sweep lands beside its jobs, not in a multirun/ folder of its own.
    assert (tmp_path / "exp" / "multirun.yaml").is_file() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_a_sweep_under_torchrun_keeps_one_folder_per_job_on_every_rank(tmp_path):
    """Both ranks run both jobs in one process group, in the folders rank 0's clock names."""
    result = sweep(tmp_path, "run.seed=0,1", *TINY_RUN, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    for job in (0, 1):
        assert_trained(sweeps[0] / str(job), job)
        # rank 1 saved its shards into the same job's folder (engine=auto: FSDP2 under torchrun)
        assert (sweeps[0] / str(job) / "checkpoints" / "step_00000002" / "optimizer_rank00001.safetensors").is_file()
