"""AdamW that can be told to skip its next update, and that clips and checks gradients it sees whole."""

from __future__ import annotations

import math
from typing import Any

import torch


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW with two additions the guards need.

    `skip_next = True` makes the next `step()` leave weights and moments untouched (a skipped step must not even
    move Adam's moments). With `clip` set (the optimizer sees full gradients: one process, or DeepSpeed ZeRO-0),
    `step()` also clips to that norm, records it in `last_norm`, and skips when it is not finite. Under ZeRO 1-3
    DeepSpeed clips and checks the norm of the partitioned gradients itself, before it calls this step.
    """

    def __init__(self, params: Any, clip: float | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.clip = clip
        self.skip_next = False
        self.stepped = False  # whether step() ran since reset()
        self.last_skipped = False
        self.last_norm = float("nan")

    def reset(self) -> None:
        self.stepped, self.last_skipped, self.last_norm = False, False, float("nan")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        skip = self.skip_next
        if self.clip is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf)
            self.last_norm = float(norm)
            skip = skip or not math.isfinite(self.last_norm)
        self.stepped = True
        # ZeRO-3 calls this once per parameter sub-group: a skip holds for all of them.
        self.last_skipped = self.last_skipped or skip
        if self.last_skipped:
            return None
        return super().step(closure)
