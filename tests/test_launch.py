"""launch/: the torchrun launchers and the SLURM script. Fast tests check syntax, usage, the torchrun command line
and the stop logic (with a stand-in for torchrun); slow ones train for real: 2 nodes x 1 process over loopback,
SIGTERM to both node launchers then resume, and the sbatch script with stub srun / scontrol / scancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_helpers import (
    LAUNCH,
    ROOT,
    assert_nothing_left,
    checkpoints,
    descendants,
    env,
    finish,
    free_port,
    logs_text,
    metrics_steps,
    overrides,
    start,
    stop_started,
    wait_for,
)

SCRIPTS = ["single_node.sh", "multinode.sh", "slurm.sbatch"]
QUICK = 60  # seconds for a launcher that only checks its arguments or prints
FAKE_TIMEOUT = 60  # seconds for a launch of the fake torchrun to end once stopped
# A real launch (1-3 min on 2 cores): over `finish`'s 600 s, so a hung launch fails there, with its logs.
LAUNCH_TEST_TIMEOUT = 900


@pytest.fixture(autouse=True)
def _no_launch_outlives_its_test():
    yield
    stop_started()


# ---- fast: syntax, usage, the torchrun command line, the stop logic ------------------------------------------------


@pytest.mark.parametrize("name", [*SCRIPTS, "lib.sh"])
def test_scripts_parse(name):
    result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True, timeout=QUICK)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_executable_and_explain_themselves(name):
    assert os.access(LAUNCH / name, os.X_OK), f"chmod +x launch/{name}"
    result = subprocess.run([str(LAUNCH / name), "--help"], capture_output=True, text=True, env=env(), timeout=QUICK)
    assert result.returncode == 0, result.stderr
    assert "Hydra override" in result.stdout and "NPROC_PER_NODE" in result.stdout
    assert not any(line.startswith("#") for line in result.stdout.splitlines())  # comment marks stripped


def test_multinode_usage_lists_its_variables():
    text = subprocess.run([str(LAUNCH / "multinode.sh"), "-h"], capture_output=True, text=True, timeout=QUICK).stdout
    for name in ["NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID", "MAX_RESTARTS"]:
        assert name in text, name


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"NNODES": 2, "MASTER_ADDR": "a"}, "needs NODE_RANK"),
        ({"NNODES": 2, "NODE_RANK": 0}, "needs MASTER_ADDR"),
        ({"NNODES": 2, "NODE_RANK": 2, "MASTER_ADDR": "a"}, "NODE_RANK must be 0..1"),
        ({"NNODES": "1:2"}, "needs RDZV_ENDPOINT"),
        ({"NNODES": 2, "RDZV_ENDPOINT": "host"}, "host:port"),
        ({"MASTER_PORT": 70000}, "MASTER_PORT must be a TCP port"),
        ({"NPROC_PER_NODE": 0}, "NPROC_PER_NODE must be a positive integer"),
        ({"MAX_RESTARTS": "x"}, "MAX_RESTARTS must be"),
    ],
)
def test_multinode_names_the_variable_to_fix(variables, message):
    result = subprocess.run(
        [str(LAUNCH / "multinode.sh")],
        capture_output=True,
        text=True,
        env=env(**{"NPROC_PER_NODE": 1, **variables}),
        timeout=QUICK,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "--help" in result.stderr


def test_sbatch_outside_slurm_is_a_clear_error():
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True, env=env(), timeout=QUICK
    )
    assert result.returncode == 2 and "submit this with sbatch" in result.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: `-c ...` counts 2 GPUs; `-m torch.distributed.run ARGS` records ARGS, then (with
# FAKE_WORKER) runs one worker like torchrun does, in a session of its own, and exits with its status.
if [[ $1 == -c ]]; then echo 2; exit 0; fi
shift 2
printf '%s\\n' "$@" > "$FAKE_OUT/torchrun_args"
[[ -n ${FAKE_RENDEZVOUS:-} ]] && exec sleep 60  # still waiting for the other nodes: no worker yet
[[ -z ${FAKE_WORKER:-} ]] && exit 0
setsid "$REAL_PYTHON" -c "$FAKE_WORKER" &
wait $!
"""
WORKER = """import os, signal, sys, time
out = os.environ["FAKE_OUT"]
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
open(out + "/ready", "w").close()
while not got:
    time.sleep(0.02)
open(out + "/saved", "w").close()
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return {"PYTHON": path, "FAKE_OUT": tmp_path, "REAL_PYTHON": sys.executable}


def torchrun_args(script: str, fake: dict, *hydra: str, **variables: object) -> list[str]:
    result = subprocess.run(
        [str(LAUNCH / script), *hydra], capture_output=True, text=True, env=env(**fake, **variables), timeout=QUICK
    )
    assert result.returncode == 0, result.stderr
    return (fake["FAKE_OUT"] / "torchrun_args").read_text().splitlines()


def test_single_node_runs_one_worker_per_gpu_and_passes_overrides(fake_python):
    args = torchrun_args("single_node.sh", fake_python, "engine=deepspeed", "run.name=a b")
    assert args[:4] == ["--signals-to-handle=SIGHUP,SIGQUIT", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    assert args[-4:] == ["-m", "vlm_train.train", "engine=deepspeed", "run.name=a b"]


def test_multinode_static_and_c10d_command_lines(fake_python):
    args = torchrun_args(
        "multinode.sh",
        fake_python,
        "run.dir=x",
        NNODES=2,
        NODE_RANK=1,
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT=1234,
        NPROC_PER_NODE=3,
        TORCHRUN_ARGS="--log-dir logs",
    )
    for flag in [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=1234",
        "--nproc-per-node=3",
        "--max-restarts=0",
        "--log-dir",
        "logs",
    ]:
        assert flag in args
    assert args[-3:] == ["-m", "vlm_train.train", "run.dir=x"]
    args = torchrun_args("multinode.sh", fake_python, NNODES="2:4", RDZV_ENDPOINT="n0:29400", MAX_RESTARTS=3)
    for flag in [
        "--nnodes=2:4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=n0:29400",
        "--rdzv-id=vlm_train",
        "--max-restarts=3",
        "--nproc-per-node=2",
    ]:
        assert flag in args
    assert not any(a.startswith(("--node-rank", "--master")) for a in args)


def test_sigterm_reaches_the_worker_and_the_launcher_exits_with_its_status(fake_python, tmp_path):
    log = tmp_path / "launcher.log"
    launcher = start([str(LAUNCH / "single_node.sh")], log, **fake_python, FAKE_WORKER=WORKER, NPROC_PER_NODE=1)
    wait_for(lambda: (tmp_path / "ready").exists(), [launcher], [log], "the fake worker", timeout=60)
    os.kill(launcher.pid, signal.SIGTERM)
    time.sleep(0.2)
    started = descendants(launcher.pid)
    assert finish([launcher], [log], timeout=FAKE_TIMEOUT) == [0] and (tmp_path / "saved").exists(), log.read_text()
    assert "the workers save a checkpoint" in log.read_text()
    assert_nothing_left(started)


def test_ctrl_c_twice_kills_the_worker(fake_python, tmp_path):
    fake = fake_python
    worker = WORKER.replace("while not got:", "while True:")  # a worker that never finishes saving
    log = tmp_path / "launcher.log"
    launcher = start([str(LAUNCH / "single_node.sh")], log, **fake, FAKE_WORKER=worker, NPROC_PER_NODE=1)
    wait_for(lambda: (tmp_path / "ready").exists(), [launcher], [log], "the fake worker", timeout=60)
    os.kill(launcher.pid, signal.SIGINT)
    asked = "SIGINT: the workers save a checkpoint"  # the launcher acted on it (a Ctrl-C it ignores says nothing)
    wait_for(lambda: asked in log.read_text(), [launcher], [log], "the first Ctrl-C to reach the worker", timeout=30)
    time.sleep(0.5)
    assert launcher.poll() is None  # the first Ctrl-C asks; the worker keeps "saving"
    started = descendants(launcher.pid)
    os.kill(launcher.pid, signal.SIGINT)
    rc = finish([launcher], [log], timeout=FAKE_TIMEOUT)[0]
    assert_nothing_left(started)
    # torchrun's status passed on: its worker was killed (137), or torchrun itself was stopped first (129).
    assert rc in (128 + signal.SIGKILL, 128 + signal.SIGHUP), log.read_text()
    assert not (tmp_path / "saved").exists() and "second interrupt" in log.read_text()


def _waiting_in_sleep(pid: int) -> bool:
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].endswith(b"sleep"):
                return True
        except OSError:
            continue
    return False


def test_a_stop_before_any_worker_started_ends_torchrun(fake_python, tmp_path):
    log = tmp_path / "launcher.log"
    launcher = start([str(LAUNCH / "multinode.sh")], log, **fake_python, FAKE_RENDEZVOUS=1, NPROC_PER_NODE=1)
    # The fake torchrun waits in `sleep` (a rendezvous that never completes); under load it may still be the
    # shell that execs it, so wait for the sleep itself rather than a fixed time.
    wait_for(lambda: _waiting_in_sleep(launcher.pid), [launcher], [log], "the fake torchrun's rendezvous", timeout=60)
    torchrun = descendants(launcher.pid)
    os.kill(launcher.pid, signal.SIGTERM)
    rc = finish([launcher], [log], timeout=FAKE_TIMEOUT)[0]
    assert rc == 128 + signal.SIGHUP, log.read_text()  # torchrun's status, passed on
    assert "nothing to save" in log.read_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in torchrun)


def test_sbatch_derives_the_rendezvous_from_slurm(tmp_path):
    """slurm.sbatch with a stub srun (runs node 0 here) and a stand-in launch/multinode.sh that prints what it got."""
    bin_dir, repo = stub_slurm(tmp_path), tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    fake = repo / "launch" / "multinode.sh"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'env | grep -E "^(NNODES|NODE_RANK|MASTER_ADDR|MASTER_PORT|SRUN_CPUS_PER_TASK)="\n'
        'printf "ARG=%s\\n" "$@"\n'
    )
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "run.dir=r", "run.name=a b"],
        capture_output=True,
        text=True,
        timeout=QUICK,
        env=slurm_env(
            bin_dir,
            tmp_path,
            SLURM_SUBMIT_DIR=repo,
            SLURM_JOB_NUM_NODES=2,
            FAKE_HOSTS="nodeA nodeB",
            SLURM_CPUS_PER_TASK=8,
        ),
    )
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    expected = {
        "NNODES=2",
        "NODE_RANK=0",
        "MASTER_ADDR=nodeA",
        f"MASTER_PORT={20000 + 4242}",
        "SRUN_CPUS_PER_TASK=8",
        "ARG=run.dir=r",
        "ARG=run.name=a b",
    }
    assert expected <= lines, result.stdout
    assert "srun --nodes=2 --ntasks-per-node=1" in (tmp_path / "slurm_calls").read_text()


STUB_SRUN = """#!/usr/bin/env bash
# srun on one node: skip srun's options, record them, run the command as node 0.
echo "srun $*" >> "$STUB_DIR/slurm_calls"
while [[ $1 == -* ]]; do shift; done
echo $$ > "$STUB_DIR/srun.pid"
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""
STUB_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_DIR/slurm_calls"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' $FAKE_HOSTS; fi
"""
STUB_SCANCEL = """#!/usr/bin/env bash
# scancel --signal=SIG JOB: like slurmd, signal every process of the step (the launcher, torchrun, the workers).
echo "scancel $*" >> "$STUB_DIR/slurm_calls"
sig=${1#--signal=}
tree() { local c; for c in $(pgrep -P "$1"); do echo "$c"; tree "$c"; done; }
root=$(cat "$STUB_DIR/srun.pid")
kill -"$sig" "$root" $(tree "$root") 2>/dev/null || true
"""


def stub_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("scancel", STUB_SCANCEL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(bin_dir: Path, stub_dir: Path, **variables: object) -> dict[str, str]:
    base = {
        "SLURM_JOB_ID": 4242,
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": 1,
        "FAKE_HOSTS": "localhost",
        "SLURM_SUBMIT_DIR": ROOT,
        "STUB_DIR": stub_dir,
    }
    merged = env(**{**base, **variables})
    merged["PATH"] = f"{bin_dir}{os.pathsep}{merged['PATH']}"
    return merged


# ---- slow: real training runs ---------------------------------------------------------------------------------------


def node_launchers(run_dir: Path, tmp_path: Path, tag: str, hydra: list[str], **rendezvous: object):
    logs = [tmp_path / f"{tag}_node{rank}.log" for rank in (0, 1)]
    processes = [
        start(
            [str(LAUNCH / "multinode.sh"), *hydra],
            logs[rank],
            NNODES=2,
            NPROC_PER_NODE=1,
            **({"NODE_RANK": rank} if "MASTER_ADDR" in rendezvous else {}),
            **rendezvous,
        )
        for rank in (0, 1)
    ]
    return processes, logs


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TEST_TIMEOUT)
def test_two_nodes_over_loopback_train_to_the_end(tmp_path):
    run_dir = tmp_path / "run"
    processes, logs = node_launchers(
        run_dir,
        tmp_path,
        "run",
        overrides(run_dir, 3, "engine=deepspeed"),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
    )
    assert finish(processes, logs) == [0, 0], logs_text(logs)[-4000:]
    saved = checkpoints(run_dir)
    assert list(saved) == [4] and saved[4]["world_size"] == 2, saved
    assert (run_dir / "checkpoints" / "step_00000004" / "loader_rank00001.json").is_file()  # node 1's rank saved
    assert metrics_steps(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TEST_TIMEOUT)
def test_sigterm_to_both_nodes_saves_and_the_next_launch_resumes(tmp_path):
    """As SLURM does at preemption: SIGTERM to every node's launcher mid-run; the relaunch (c10d rendezvous this
    time) resumes from the checkpoint and finishes."""
    run_dir, total = tmp_path / "run", 1 + 40
    hydra = overrides(run_dir, total - 1, "engine=deepspeed", "train.resume=auto")
    processes, logs = node_launchers(
        run_dir, tmp_path, "first", hydra, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()
    )
    wait_for(lambda: len(metrics_steps(run_dir)) >= 3, processes, logs, "3 training steps")
    for p in processes:
        os.kill(p.pid, signal.SIGTERM)
    assert finish(processes, logs) == [0, 0], logs_text(logs)[-4000:]
    saved = checkpoints(run_dir)
    assert len(saved) == 1, saved
    ((stopped_at, state),) = saved.items()
    assert 3 <= stopped_at < total and state["step"] == stopped_at and state["world_size"] == 2
    assert "stopping after step" in logs_text(logs) and "SIGTERM" in logs_text(logs)
    assert not (run_dir / "summary.json").exists()

    processes, logs = node_launchers(
        run_dir, tmp_path, "resumed", hydra, RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="resume-test"
    )
    assert finish(processes, logs) == [0, 0], logs_text(logs)[-4000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'}" in logs_text(logs)
    assert max(checkpoints(run_dir)) == total
    assert metrics_steps(run_dir) == list(range(1, total + 1))  # steps after the checkpoint were not run twice
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == total


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TEST_TIMEOUT)
def test_sbatch_preemption_notice_saves_and_requeues(tmp_path):
    """slurm.sbatch run with bash, fake SLURM variables and stub srun / scontrol / scancel on one node: SIGTERM to
    the batch shell (what --signal=B:TERM@120 does) reaches the workers, which save; REQUEUE=1 requeues the job."""
    run_dir, total = tmp_path / "run", 1 + 40
    bin_dir, log = stub_slurm(tmp_path), tmp_path / "batch.log"
    batch = start(
        ["bash", str(LAUNCH / "slurm.sbatch"), *overrides(run_dir, total - 1)],
        log,
        slurm_env(bin_dir, tmp_path, MASTER_PORT=free_port(), NPROC_PER_NODE=1, REQUEUE=1),
    )
    wait_for(lambda: len(metrics_steps(run_dir)) >= 3, [batch], [log], "3 training steps")
    os.kill(batch.pid, signal.SIGTERM)
    assert finish([batch], [log]) == [0], log.read_text()[-4000:]
    saved = checkpoints(run_dir)
    assert len(saved) == 1 and 3 <= next(iter(saved)) < total, saved
    calls = (tmp_path / "slurm_calls").read_text()
    assert "scontrol show hostnames localhost" in calls
    assert "scancel --signal=TERM 4242" in calls and "scontrol requeue 4242" in calls, calls


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TEST_TIMEOUT)
def test_the_default_engine_trains_data_parallel_and_evaluates_under_fsdp2(tmp_path):
    """`launch/single_node.sh` with two processes and no engine= override: engine=auto picks FSDP2 (which gathers
    weights collectively), says so, and every rank runs the periodic and final evaluation."""
    run_dir = tmp_path / "run"
    hydra = overrides(run_dir, 3, "eval.enabled=true", "eval.interval=2", "eval.num_loss=4")
    hydra += ["eval.num_caption=2", "eval.num_grounding=2", "eval.max_new_tokens=4"]
    log = tmp_path / "run.log"
    process = start([str(LAUNCH / "single_node.sh"), *hydra], log, NPROC_PER_NODE=2)
    assert finish([process], [log]) == [0], logs_text([log])[-4000:]
    text = logs_text([log])
    assert "engine fsdp2 (engine=auto) | 2 rank(s)" in text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_loss" in r] == [2, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["heldout_exact_match_n"] == 2
    assert summary["heldout_loss"] == rows[-1]["heldout_loss"]  # the final evaluation reused step 4's
    assert checkpoints(run_dir)[4]["engine"] == "fsdp2" and checkpoints(run_dir)[4]["zero_stage"] is None
