"""Metrics sinks (rank 0 only): a console progress line, metrics.jsonl in the run folder, and W&B when enabled.

The console and metrics.jsonl get the scalars of every step; W&B gets them too, and also what only a dashboard
shows: histograms (the pack fill of the step's packs) and the held-out examples as a table with their pictures.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_train.data.batch import PackedBatch
from vlm_train.jsonio import dumps
from vlm_train.train.config import LoggerConfig
from vlm_train.train.schedule import Position
from vlm_train.train.step import StepResult

log = logging.getLogger("vlm_train")
METRICS_FILE = "metrics.jsonl"
WANDB_RUN_FILE = "wandb_run.json"  # the W&B run id of the run folder's latest fresh start
EXAMPLES_KEY = "heldout/examples"
EXAMPLE_COLUMNS = ("image", "prompt", "prediction", "reference", "correct", "task")
FILL_BINS = 20  # pack fill histograms: bins of 5% over [0, 1], the same every step


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop rows after `last_step` (steps a resumed run will train again), so each step appears once."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(row + "\n" for row in rows))


def step_record(
    position: Position,
    stage: str,
    lrs: dict[str, float],
    r: StepResult,
    seconds: float,
    skipped: dict[str, int],
    mfu: float | None,
) -> dict[str, Any]:
    """The metrics of one optimizer step (all ranks together)."""
    record: dict[str, Any] = {
        "step": position.step,
        "stage": stage,
        "loss": r.loss,
        "grad_norm": r.grad_norm,
        "lr": max(lrs.values(), default=0.0),
        **{f"lr/{name}": lr for name, lr in lrs.items() if not name.endswith("/no_decay")},
        "tokens": position.tokens,
        "tokens_per_s": r.tokens / seconds,
        "samples_per_s": r.samples / seconds,
        "supervised_tokens_per_s": r.supervised / seconds,
        "step_time_s": seconds,
        "packing/llm_fill": r.llm_fill / max(r.packs, 1),
        "packing/vit_fill": r.vit_fill / max(r.packs, 1),
        "tflops_per_s": r.flops / seconds / 1e12,
        "mfu": mfu,
        "skipped_step": int(r.skipped is not None),
        "skipped_steps": sum(skipped.values()),
        **{f"skipped_steps/{reason}": count for reason, count in skipped.items()},
        **r.extra,
    }
    for prefix, sums in (("loss/source", r.by_source), ("loss/task", r.by_task)):
        record.update({f"{prefix}/{key}": total / count for key, (total, count) in sums.items() if count})
    return record


def pack_fills(packs: Sequence[PackedBatch], llm_budget: int, vit_budget: int) -> dict[str, list[float]]:
    """Each pack's LLM fill (tokens / llm_budget) and ViT fill (patches / vit_budget), for `log(histograms=...)`;
    the means are step_record's packing/llm_fill and packing/vit_fill."""
    return {
        "packing/llm_fill_per_pack": [pack.num_tokens / llm_budget for pack in packs],
        "packing/vit_fill_per_pack": [pack.num_patches / vit_budget for pack in packs],
    }


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B run this launch logs to: a launch that resumes from a checkpoint continues the run of its folder's
    last fresh start; a fresh start (a new folder, or train.resume=never in a used one) begins a new W&B run, since
    its steps start again at 1 and W&B drops steps that do not move forward."""
    path = run_dir / WANDB_RUN_FILE
    if resumed and path.is_file():
        return str(json.loads(path.read_text())["id"])
    run_id = secrets.token_hex(8)
    path.write_text(dumps({"id": run_id}) + "\n")
    return run_id


class MetricsLogger:
    """One `log(metrics)` per optimizer step; every sink sees the same numbers. Off on ranks other than 0.

    `start_step` is the step the launch resumes after (0: a fresh start); it decides the W&B run (wandb_run_id).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        total_steps: int,
        config: dict[str, Any],
        enabled: bool = True,
        start_step: int = 0,
    ):
        self.cfg = cfg
        self.total_steps = total_steps
        self.enabled = enabled
        self.start = time.perf_counter()
        self.start_step = start_step
        self.last: dict[str, Any] = {}
        if enabled:
            truncate_metrics(run_dir, start_step)  # steps after it will be trained (again) by this launch
        self.file = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if enabled else None
        self.wandb_run = None
        if cfg.wandb and enabled:
            import wandb  # only when asked for: it is slow to import

            run_id = wandb_run_id(run_dir, resumed=start_step > 0)
            # The API key is read by wandb from the environment (WANDB_API_KEY); it never enters the config.
            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity or None,
                name=cfg.wandb_name or run_dir.name,
                mode=cfg.wandb_mode or None,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",  # a resumed run that was never synced (offline) is created instead
            )
            log.info("W&B run %s (%s)", run_id, f"continued after step {start_step}" if start_step else "new")

    def log(self, metrics: dict[str, Any], histograms: dict[str, Sequence[float]] | None = None) -> None:
        """The step's scalars to every sink; `histograms` (name -> values, e.g. pack_fills) to W&B only."""
        self.last = metrics
        if not self.enabled:
            return
        step = int(metrics["step"])
        assert self.file is not None
        # NaN is not JSON: a skipped step's loss is written as null (the console still says nan).
        self.file.write(dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            row = {k: v for k, v in metrics.items() if k != "step" and v is not None}
            row.update({name: fill_histogram(values) for name, values in (histograms or {}).items() if len(values)})
            self.wandb_run.log(row, step=step)
        if step == 1 or step % max(self.cfg.console_interval, 1) == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self.start
            done = max(step - self.start_step, 1)
            eta = elapsed / done * max(self.total_steps - step, 0)
            mfu = metrics.get("mfu")
            log.info(
                "step %d/%d [%s] loss %.4f | lr %.2e | %.0f tok/s | %.1f samples/s | %s | elapsed %s | eta %s",
                step,
                self.total_steps,
                metrics.get("stage", "?"),
                metrics["loss"],
                metrics.get("lr", 0.0),
                metrics.get("tokens_per_s", 0.0),
                metrics.get("samples_per_s", 0.0),
                f"MFU {mfu:.1%}" if mfu is not None else f"{metrics.get('tflops_per_s', 0.0):.3f} TFLOP/s",
                format_duration(elapsed),
                format_duration(eta),
            )

    def log_examples(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        """Held-out examples (evaluator.table_rows) as a W&B table at `step`: one row per example, its picture an
        image. Call it before or after that step's `log`, never after a later step's (W&B would drop it)."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=list(EXAMPLE_COLUMNS))
        for row in rows:
            image = row["image"]
            table.add_data(None if image is None else wandb.Image(image), *(row[c] for c in EXAMPLE_COLUMNS[1:]))
        self.wandb_run.log({EXAMPLES_KEY: table}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def fill_histogram(values: Sequence[float]) -> Any:
    """A W&B histogram of fills over fixed bins from 0 to 1 (to the largest value if one is over), so that the
    steps' histograms line up."""
    import wandb

    top = max(1.0, float(max(values)))
    return wandb.Histogram(np_histogram=np.histogram(np.asarray(values, dtype=np.float64), FILL_BINS, (0.0, top)))
