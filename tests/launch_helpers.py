"""Processes for tests/test_launch.py: the launchers' environment, process trees, waiting, and the run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TIMEOUT = 600


def env(**extra: object) -> dict[str, str]:
    """The test's environment for a launcher: one thread per process, this Python, no SLURM / torchrun leftovers."""
    launch_vars = (
        "SLURM_",
        "RDZV_",
        "MASTER_",
        "NNODES",
        "NODE_RANK",
        "NPROC_PER_NODE",
        "MAX_RESTARTS",
        "TORCHRUN_ARGS",
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(launch_vars)}
    base.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, WANDB_MODE="offline")
    base.update({k: str(v) for k, v in extra.items()})
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(run_dir: Path, steps: int, *more: str) -> list[str]:
    """A tiny model on a few synthetic images, small packs, 1 + `steps` optimizer steps."""
    return [
        *SMALL_DATA,
        "model.llm.num_layers=1",
        "model.vision.depth=1",
        "data.pack.llm_budget=256",
        "data.pack.vit_budget=1024",
        "curriculum.stages.0.steps=1",
        f"curriculum.stages.1.steps={steps}",
        "eval.enabled=false",
        "logger.console_interval=1",
        f"run.dir={run_dir}",
        *more,
    ]


# The signals the launchers trap or pass on. A test run started under nohup, or in the background of a script,
# holds some of them ignored, children inherit that, and bash cannot trap a signal ignored on entry: the launcher
# would sit through both Ctrl-Cs. Every launch starts with them at their defaults, as from a terminal.
LAUNCH_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
STARTED: list[subprocess.Popen] = []  # every launch of the running test, ended by `stop_started` after it


def default_signals() -> None:
    """preexec_fn: the launch signals at their defaults in the child, whatever the test run inherited."""
    for sig in LAUNCH_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def start(
    command: list[str], log: Path, environ: dict[str, str] | None = None, **variables: object
) -> subprocess.Popen:
    """`command` in a session of its own, output to `log`, in `environ` (default: `env(**variables)`)."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(**variables) if environ is None else environ,
            start_new_session=True,
            preexec_fn=default_signals,
        )
    STARTED.append(process)
    return process


def stop_started() -> None:
    """Kills what the test's launches left running (a failed assertion or a timeout skips their `finish`)."""
    kill_all([p for p in STARTED if p.poll() is None])
    STARTED.clear()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        for pid in [p.pid, *descendants(p.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)  # SIGKILLed: only a process stuck in the kernel outlives this


def finish(processes: list[subprocess.Popen], logs: list[Path], timeout: float = TIMEOUT) -> list[int]:
    """Exit codes; on a timeout every process of the launch is killed and the test fails with the logs."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
    except subprocess.TimeoutExpired:
        kill_all(processes)
        pytest.fail("launch timed out:\n" + logs_text(logs)[-4000:])


def wait_for(predicate, processes: list[subprocess.Popen], logs: list[Path], what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            codes = [p.poll() for p in processes]
            kill_all(processes)
            pytest.fail(f"gave up waiting for {what}; exit codes {codes}\n" + logs_text(logs)[-4000:])
        time.sleep(0.1)


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def checkpoints(run_dir: Path) -> dict[int, dict]:
    """step -> trainer_state.json of each complete checkpoint."""
    found = {}
    for folder in sorted((run_dir / "checkpoints").glob("step_*")):
        if (folder / "trainer_state.json").is_file():
            found[int(folder.name[len("step_") :])] = json.loads((folder / "trainer_state.json").read_text())
    return found


def logs_text(logs: list[Path]) -> str:
    return "\n".join(log.read_text() for log in logs)


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has ended)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def assert_nothing_left(pids: list[int]) -> None:
    """The launcher leaves no process behind (torchrun, workers, its stop re-sender)."""
    deadline = time.monotonic() + 5
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pids), [Path(f"/proc/{pid}/cmdline").read_text() for pid in alive(pids)]
