"""AdamW that skips an update when told to, and clips and checks the gradients it sees whole."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepReport:
    """What the optimizer did with one step's gradients."""

    applied: bool = False  # weights and Adam moments moved
    grad_norm: float = float("nan")  # the global norm before clipping, when this optimizer measured it
    calls: int = 0  # step() calls (ZeRO-3 steps each parameter sub-group on its own)


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW with the two things the guards need.

    `step(skip=True)` leaves weights and moments untouched (a skipped step must not even move Adam's moments).
    With `clip` set (the optimizer sees full gradients: one process, or DeepSpeed ZeRO-0) `step()` also clips to
    that norm, reports it, and skips when it is not finite. Under ZeRO 1-3 DeepSpeed clips and checks the norm of
    the partitioned gradients itself before it calls `step()`. Every call returns a StepReport.

    DeepSpeed calls `step()` itself, with no arguments; a caller that steps through it decides inside
    `with optimizer.deciding(skip) as report:`, and reads what all the calls in that block did from `report`.
    """

    def __init__(self, params: Any, clip: float | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.clip = clip
        self._decision: tuple[bool, StepReport] | None = None  # set only by deciding()

    @contextlib.contextmanager
    def deciding(self, skip: bool) -> Iterator[StepReport]:
        """Every `step()` inside the block skips when `skip`; the yielded report sums up what they did."""
        report = StepReport()
        self._decision = (skip, report)
        try:
            yield report
        finally:
            self._decision = None

    @torch.no_grad()
    def step(self, closure: Any = None, skip: bool = False) -> StepReport:  # type: ignore[override]
        if self._decision is not None:
            skip, report = skip or self._decision[0], self._decision[1]
        else:
            report = StepReport()
        if self.clip is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf)
            report.grad_norm = float(norm)
            skip = skip or not math.isfinite(report.grad_norm)
        # ZeRO-3 calls this once per parameter sub-group: one skip holds for the whole step.
        skip = skip or (report.calls > 0 and not report.applied)
        report.calls += 1
        report.applied = not skip
        if not skip:
            super().step(closure)
        return report
