"""Held-out score curves of runs, against VLM steps and against training wall time. Prints JSON; --plot writes a PNG
(needs matplotlib, which is not a dependency of vlm_train).

    python tools/eval_curves.py RUN_A RUN_B [--labels A B] [--metric heldout_exact_match] [--plot curves.png]

A run's VLM steps are its steps outside `kind: vision` stages (a run with a vision stage first is shifted by it, so
curves compare at the same number of VLM steps). Wall time is the sum of `step_time_s` up to the step: training
only, not the held-out evaluations, including the vision stage's steps. `first_at_or_above` gives, per threshold,
the first evaluated VLM step and wall time at which the score reached it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlm_train.jsonio import dumps


def curve(run_dir: Path, metric: str, vision_stages: set[str]) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, vision_steps, points = 0.0, 0, []
    for row in rows:
        seconds += float(row.get("step_time_s") or 0.0)
        if row.get("stage") in vision_stages:
            vision_steps += 1
        if row.get(metric) is not None and row.get("stage") not in vision_stages:
            points.append(
                {"vlm_step": row["step"] - vision_steps, "train_seconds": round(seconds, 1), metric: row[metric]}
            )
    return {"run": str(run_dir), "vision_steps": vision_steps, "train_seconds": round(seconds, 1), "points": points}


def first_at_or_above(points: list[dict[str, Any]], metric: str, threshold: float) -> dict[str, Any] | None:
    for point in points:
        if point[metric] >= threshold:
            return {"vlm_step": point["vlm_step"], "train_seconds": point["train_seconds"]}
    return None


AXES = {
    "vlm_step": "VLM steps (vision stage not counted)",
    "train_seconds": "training wall time, s (vision stage included)",
}


def plot(curves: list[dict[str, Any]], labels: list[str], metric: str, path: Path, xs: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4), squeeze=False)
    for ax, x in zip(axes[0], xs):
        for c, label in zip(curves, labels):
            ax.plot([p[x] for p in c["points"]], [p[metric] for p in c["points"]], marker=".", label=label)
        ax.set_xlabel(AXES[x])
        ax.set_ylabel(metric)
        ax.axhline(0.9, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with metrics.jsonl)")
    parser.add_argument("--labels", nargs="*", default=None, help="a label per run (default: the folder names)")
    parser.add_argument("--metric", default="heldout_exact_match")
    parser.add_argument("--vision-stages", nargs="*", default=["vision"], help="names of the vision stages")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[0.8, 0.9])
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the curves here")
    parser.add_argument("--x", nargs="+", choices=sorted(AXES), default=["vlm_step", "train_seconds"])
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    curves = [curve(run, args.metric, set(args.vision_stages)) for run in args.runs]
    for c, label in zip(curves, labels):
        c["label"] = label
        c["first_at_or_above"] = {str(t): first_at_or_above(c["points"], args.metric, t) for t in args.thresholds}
    if args.plot is not None:
        plot(curves, labels, args.metric, args.plot, args.x, args.title)
    print(dumps(curves, indent=1))


if __name__ == "__main__":
    main()
