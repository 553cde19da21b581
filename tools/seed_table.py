"""The default run's promise, measured: `vlm-train` (plus overrides) for several seeds and several checkouts of the
code, each run with a fresh `VLM_TRAIN_CACHE` (so the wall time includes making the synthetic data) and one run at a
time, interleaved by seed so that the codes share the machine's mood. Prints JSON: one row per run (wall seconds,
training seconds, held-out caption exact match), then per code the median wall time and the lowest score.

    python tools/seed_table.py --seeds 0 1 2 --code new=. --code old=/tmp/old -- data=synthetic_video

A `--code NAME=DIR` is a checkout of this repository (e.g. `git worktree add /tmp/old 8757906`); a copy of its
package (with its conf/ as vlm_train/conf, as the installed package has it) goes first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vlm_train.jsonio import dumps

SCORE = "heldout_exact_match"


def package_copy(checkout: Path, into: Path) -> Path:
    """A copy of `checkout`'s package in `into`, its Hydra configs where the installed package has them."""
    shutil.copytree(checkout / "vlm_train", into / "vlm_train", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(checkout / "conf", into / "vlm_train" / "conf")
    return into


def one_run(package: Path, seed: int, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One `python -m vlm_train.train` of the package copy in `package`, with a fresh cache; its wall time and
    summary."""
    env = {**os.environ, "PYTHONPATH": str(package), "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory(prefix="vlm_cache_") as cache:
        env["VLM_TRAIN_CACHE"] = cache
        command = [sys.executable, "-m", "vlm_train.train", f"run.seed={seed}", f"run.dir={run_dir}", *overrides]
        started = time.perf_counter()
        # Run from the package copy's folder: `python -m` puts the working directory first on sys.path, so from a
        # checkout's root that checkout's package would run instead of the copy.
        done = subprocess.run(command, env=env, cwd=package, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "train_s": round(summary["train_seconds"], 1),
        SCORE: summary.get(SCORE),
        "steps": summary["steps"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--code", action="append", default=[], help="NAME=DIR, a checkout (default: this one)")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temp folder)")
    parser.add_argument("overrides", nargs="*", help="vlm-train overrides, after --")
    args = parser.parse_args(argv)
    codes = dict(c.split("=", 1) for c in args.code) or {"this": str(Path(__file__).resolve().parents[1])}
    out = args.out or Path(tempfile.mkdtemp(prefix="seed_table_"))
    packages = {name: package_copy(Path(folder), out / "code" / name) for name, folder in codes.items()}
    rows = []
    for seed in args.seeds:
        for name, package in packages.items():
            row = {"code": name, **one_run(package, seed, list(args.overrides), out / "runs" / f"{name}_seed{seed}")}
            print(dumps(row), flush=True)
            rows.append(row)
    summary = {}
    for name in codes:
        mine = [r for r in rows if r["code"] == name]
        scores = [r[SCORE] for r in mine if r[SCORE] is not None]
        summary[name] = {
            "median_wall_s": statistics.median(r["wall_s"] for r in mine),
            "median_train_s": statistics.median(r["train_s"] for r in mine),
            f"min_{SCORE}": min(scores) if scores else None,
            SCORE: [r[SCORE] for r in mine],
        }
    print(dumps({"overrides": args.overrides, "seeds": args.seeds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
