"""Metrics sinks (rank 0 only): a console progress line, metrics.jsonl in the run folder, and W&B when enabled."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from vlm_train.jsonio import dumps
from vlm_train.train.config import LoggerConfig
from vlm_train.train.schedule import Position
from vlm_train.train.step import StepResult

log = logging.getLogger("vlm_train")
METRICS_FILE = "metrics.jsonl"


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


class MetricsLogger:
    """One `log(metrics)` per optimizer step; every sink sees the same numbers. Off on ranks other than 0."""

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

            # The API key is read by wandb from the environment (WANDB_API_KEY); it never enters the config.
            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity or None,
                name=cfg.wandb_name or run_dir.name,
                mode=cfg.wandb_mode or None,
                dir=str(run_dir),
                config=config,
                # One W&B run per run folder: a resumed launch continues it.
                id=hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],
                resume="allow",
            )

    def log(self, metrics: dict[str, Any]) -> None:
        self.last = metrics
        if not self.enabled:
            return
        step = int(metrics["step"])
        assert self.file is not None
        # NaN is not JSON: a skipped step's loss is written as null (the console still says nan).
        self.file.write(dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=step)
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

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
