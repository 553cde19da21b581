"""This rank's packs through the curriculum: the loader is rebuilt (its state carried over) when a stage changes the
pack budgets or the resolution range, and its mixture is set at every stage start."""

from __future__ import annotations

import logging
from typing import Any

from vlm_train.data.batch import PackedBatch
from vlm_train.data.config import DataConfig
from vlm_train.data.loader import PackedLoader, build_loader
from vlm_train.model.config import ModelConfig
from vlm_train.train.builders import DataSetup, build_encoder, build_stream
from vlm_train.train.config import StageConfig
from vlm_train.train.curriculum import stage_data
from vlm_train.train.guards import FaultInjector

log = logging.getLogger("vlm_train")


class RankData:
    """The data loader of one rank, through the stages of the curriculum."""

    def __init__(
        self,
        setup: DataSetup,
        data: DataConfig,
        model: ModelConfig,
        seed: int,
        rank: int,
        world_size: int,
        faults: FaultInjector,
    ):
        self.setup, self.base, self.model = setup, data, model
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.faults = faults
        self.cfg: DataConfig | None = None
        self.loader: PackedLoader | None = None

    def enter(self, stage: StageConfig, state: dict[str, Any] | None = None) -> None:
        """Make the loader for `stage`, from `state` (a checkpoint's) or from where the previous stage left it."""
        cfg = stage_data(self.base, stage)
        if self.loader is not None and state is None:
            state = self.loader.state_dict() if cfg != self.cfg else None
        if self.loader is None or cfg != self.cfg or state is not None:
            if self.loader is not None:
                self.loader.close()
            encoder = build_encoder(self.setup.tokenizer, cfg, self.model) if cfg.image != self.base.image else None
            stream = build_stream(self.setup, cfg, self.seed, self.rank, self.world_size, encoder)
            self.loader = build_loader(self.faults.wrap_stream(stream), cfg.num_workers)
            self.cfg = cfg
            if state is not None:
                try:
                    self.loader.load_state_dict(state)
                except ValueError as exc:
                    raise ValueError(
                        f"stage {stage.name!r}: the data loader cannot continue under this stage's "
                        f"data overrides ({exc})"
                    ) from exc
        self.loader.set_weights(dict(stage.data.mixture) or None)

    def next_packs(self, count: int) -> list[PackedBatch]:
        assert self.loader is not None
        return [next(self.loader) for _ in range(count)]

    @property
    def budgets(self) -> tuple[int, int]:
        assert self.cfg is not None
        return self.cfg.pack.llm_budget, self.cfg.pack.vit_budget

    def state_dict(self) -> dict[str, Any]:
        assert self.loader is not None
        return self.loader.state_dict()

    def skipped(self) -> dict[str, int]:
        return self.loader.skipped() if self.loader is not None else {}

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
