"""Engines compared on one model: peak host memory per rank (at initialisation and over the run), the loader
workers' resident memory, step time, checkpoint save and load time, bytes per rank, and resharding. Prints JSON.

    python tools/bench_engines.py                                   # the issue's 495M model, 2 ranks, 2 steps
    python tools/bench_engines.py --engines single fsdp2 --tiny     # the tiny default model: seconds (tests)

Each engine trains in its own launch (`python -m vlm_train.train`, or torchrun for several ranks) on the built-in
synthetic data: stage 1 (projector) one step, stage 2 (everything) one step, then the final checkpoint; no
evaluation. A sampler reads every process's resident set (VmRSS, /proc) every 0.1 s: the rank processes (children
of torchrun) and their children (loader workers). "init" is the peak until the log's first stage line (model
built, engine ready), "run" the peak over the whole launch. The step time is the median of the steps' own
seconds (metrics.jsonl). For fsdp2 the checkpoint is then resumed on --reshard-to ranks: the weights' load time
is the reshard's. A launch the kernel kills (OOM) is reported with its exit status, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vlm_train.jsonio import dumps

ENGINES = {
    "single": ["engine=single"],
    "deepspeed2": ["engine=deepspeed", "engine.zero_stage=2"],
    "deepspeed3": ["engine=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine=fsdp2"],
}
MODEL_495M = ["+model/llm=qwen2_5_0_5b"]  # with the tiny default tower
DATA = [
    "data.synthetic.num_train_images=200",
    "data.synthetic.num_heldout_images=20",
    "data.synthetic.images_per_shard=50",
    "curriculum.stages.0.steps=1",
    "curriculum.stages.1.steps=1",
    "eval.enabled=false",
    "logger.console_interval=1",
]


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class Sampler(threading.Thread):
    """Peak RSS of each rank process and of each rank's children (loader workers), split at `mark()`."""

    def __init__(self, root: int, torchrun: bool) -> None:
        super().__init__(daemon=True)
        self.root, self.torchrun = root, torchrun
        self.ranks: dict[int, dict[str, float]] = {}  # rank pid -> {"init": peak, "run": peak}
        self.workers: dict[int, float] = {}  # worker pid -> peak
        self.marked = False
        self.done = threading.Event()

    def mark(self) -> None:
        self.marked = True

    def run(self) -> None:
        while not self.done.is_set():
            ranks = children(self.root) if self.torchrun else [self.root]
            for pid in ranks:
                peak = self.ranks.setdefault(pid, {"init": 0.0, "run": 0.0})
                now = rss_gb(pid)
                peak["run"] = max(peak["run"], now)
                if not self.marked:
                    peak["init"] = max(peak["init"], now)
                for worker in children(pid):
                    self.workers[worker] = max(self.workers.get(worker, 0.0), rss_gb(worker))
            time.sleep(0.1)


def launch(overrides: list[str], ranks: int, run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """One training launch, sampled; what it measured."""
    torchrun = ranks > 1 or "engine=fsdp2" in overrides
    head = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"] if torchrun else [sys.executable]
    )
    command = [*head, "-m", "vlm_train.train", f"run.dir={run_dir}", *overrides]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = Sampler(proc.pid, torchrun)
    sampler.start()
    log: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        log.append(line)
        if "stage 1 '" in line:
            sampler.mark()
    code = proc.wait()
    sampler.done.set()
    sampler.join()
    text = "".join(log)
    out: dict[str, Any] = {
        "exit_status": code,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_gb_per_rank_init": sorted(round(p["init"], 2) for p in sampler.ranks.values()),
        "peak_rss_gb_per_rank_run": sorted(round(p["run"], 2) for p in sampler.ranks.values()),
        "loader_worker_peak_rss_gb": sorted(round(v, 2) for v in sampler.workers.values()),
    }
    if code != 0:
        out["log_tail"] = text[-1500:]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        seconds = [r["step_time_s"] for r in rows if "step_time_s" in r]
        out["step_seconds"] = [round(s, 2) for s in seconds]
        out["step_seconds_median"] = round(statistics.median(seconds), 2) if seconds else None
    for name, pattern in (
        ("checkpoint_save_s", r"saved checkpoint \S+ in ([\d.]+)s"),
        ("weights_load_s", r"loaded the weights of \S+ in ([\d.]+)s"),
        ("state_load_s", r"loaded the training state of \S+ in ([\d.]+)s"),
    ):
        found = re.findall(pattern, text)
        if found:
            out[name] = float(found[-1])
    return out


def checkpoint_bytes(run_dir: Path) -> dict[str, Any]:
    """Bytes of the newest checkpoint: per rank (its own files; rank 0 also the shared ones) and in all."""
    folders = sorted((run_dir / "checkpoints").glob("step_*"))
    if not folders:
        return {}
    per_rank: dict[int, int] = {}
    for path in folders[-1].rglob("*"):
        if path.is_file():
            found = re.search(r"_rank(\d{5})", path.name)
            rank = int(found.group(1)) if found else 0
            per_rank[rank] = per_rank.get(rank, 0) + path.stat().st_size
    return {
        "checkpoint_mb_per_rank": [round(per_rank[r] / 2**20, 1) for r in sorted(per_rank)],
        "folder": str(folders[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reshard-to", type=int, default=3, help="ranks that resume fsdp2's checkpoint (0: none)")
    parser.add_argument("--tiny", action="store_true", help="the tiny default model instead of the 495M one")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers (loader worker processes per rank)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every launch")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    common = [*DATA, f"data.num_workers={args.workers}", *([] if args.tiny else MODEL_495M), *args.overrides]
    results: dict[str, Any] = {
        "ranks": args.ranks,
        "model": "tiny" if args.tiny else "495M (qwen2_5_0_5b + tiny tower)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            ranks = 1 if engine == "single" else args.ranks
            run_dir = Path(tmp) / engine
            result = launch([*ENGINES[engine], *common], ranks, run_dir, env)
            result.update(checkpoint_bytes(run_dir))
            if engine == "fsdp2" and args.reshard_to and result["exit_status"] == 0:
                folder = result.pop("folder")
                resumed = launch(
                    [*ENGINES[engine], *common, f"train.resume={folder}"], args.reshard_to, Path(tmp) / "reshard", env
                )
                result[f"reshard_{args.ranks}_to_{args.reshard_to}"] = {
                    k: resumed.get(k)
                    for k in ("exit_status", "weights_load_s", "state_load_s", "peak_rss_gb_per_rank_init")
                }
            result.pop("folder", None)
            results[engine] = result
            print(f"# {engine}: {dumps(result)}", file=sys.stderr, flush=True)
    print(dumps(results, indent=1))


if __name__ == "__main__":
    main()
