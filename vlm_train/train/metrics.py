"""Metrics sinks: a console progress line, metrics.jsonl in the run folder, and W&B when enabled."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from vlm_train.train.config import LoggerConfig

log = logging.getLogger("vlm_train")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class MetricsLogger:
    """One `log(metrics)` per optimizer step; every sink sees the same numbers."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, total_steps: int, config: dict[str, Any]):
        self.cfg = cfg
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.wandb_run = None
        if cfg.wandb:
            import wandb  # only when asked for: it is slow to import

            # The API key is read by wandb from the environment (WANDB_API_KEY); it never enters the config.
            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity or None,
                name=cfg.wandb_name or run_dir.name,
                mode=cfg.wandb_mode or None,
                dir=str(run_dir),
                config=config,
            )

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if step == 1 or step % max(self.cfg.console_interval, 1) == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.total_steps - step)
            log.info(
                "step %d/%d [%s] loss %.4f | lr %.2e | %.0f tok/s | %.1f samples/s | elapsed %s | eta %s",
                step, self.total_steps, metrics.get("stage", "?"), metrics["loss"], metrics.get("lr", 0.0),
                metrics.get("tokens_per_s", 0.0), metrics.get("samples_per_s", 0.0),
                format_duration(elapsed), format_duration(eta),
            )  # fmt: skip

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
