"""The kinds of curriculum stage, one module each (see base.py for the interface), and the run's set of them.

Adding a kind: a module in this package with a StageKind subclass, and its line in KINDS.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from vlm_train.model.vlm import VLM
from vlm_train.train.config import Config, StageConfig
from vlm_train.train.curriculum import stage_where
from vlm_train.train.distributed import DistInfo
from vlm_train.train.kinds.base import RunContext, StageKind
from vlm_train.train.kinds.draft import DraftKind
from vlm_train.train.kinds.vision import VisionKind
from vlm_train.train.kinds.vlm import VLMKind

KINDS: dict[str, type[StageKind]] = {
    VLMKind.name: VLMKind,
    VisionKind.name: VisionKind,
    DraftKind.name: DraftKind,
}

__all__ = ["KINDS", "RunContext", "StageKind", "StageKinds", "stage_kind"]


def stage_kind(name: str, cfg: Config | None = None) -> StageKind:
    """One kind outside a run (one process on the CPU, no run folder): its trainable policy and checks, for tests
    and tools."""
    return KINDS[name](RunContext(cfg or Config(), DistInfo(), torch.device("cpu"), Path()))


class StageKinds:
    """One instance of every kind the curriculum uses, in the order they first appear; `kinds[stage]` is a stage's."""

    def __init__(self, ctx: RunContext) -> None:
        self.kinds: dict[str, StageKind] = {}
        for index, stage in enumerate(ctx.cfg.curriculum.stages):
            if stage.kind not in KINDS:
                raise ValueError(f"{stage_where(index, stage)}: kind {stage.kind!r} is not one of {tuple(KINDS)}")
            if stage.kind not in self.kinds:
                self.kinds[stage.kind] = KINDS[stage.kind](ctx)
        self.stages = list(ctx.cfg.curriculum.stages)

    def __getitem__(self, stage: StageConfig) -> StageKind:
        return self.kinds[stage.kind]

    def __iter__(self) -> Iterator[StageKind]:
        return iter(self.kinds.values())

    def check_stages(self, model: VLM) -> None:
        """Each stage checked by its kind."""
        for index, stage in enumerate(self.stages):
            self[stage].check_stage(stage, stage_where(index, stage), model)
