"""This rank's packs through the curriculum: the loader is rebuilt (its state carried over) when a stage changes the
pack budgets, the image settings or the system prompt, and its mixture is set at every stage start."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlm_train.data.batch import PackedBatch
from vlm_train.data.config import DataConfig
from vlm_train.data.loader import PackedLoader, build_loader
from vlm_train.data.pack_cost import FlopsCost
from vlm_train.model.config import ModelConfig
from vlm_train.train.builders import DataSetup, build_encoder, build_stream
from vlm_train.train.config import StageConfig
from vlm_train.train.curriculum import stage_data
from vlm_train.train.guards import FaultInjector


class RankData:
    """The data loader of one rank, through the stages of the curriculum; a checkpoint part (the loader state)."""

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
        self.cfg: DataConfig | None = None  # the current stage's data config, mixture aside
        self.loader: PackedLoader | None = None
        self._restored: dict[str, Any] | None = None

    def enter(self, stage: StageConfig, flops_cost: FlopsCost | None = None) -> None:
        """Make the loader for `stage`: from a restored state, or from where the previous stage left it.
        `flops_cost`: what the packer balances packs by in this stage (its kind's pack cost) unless the data config
        sets one."""
        stage_cfg = stage_data(self.base, stage)
        if stage_cfg.pack.flops_cost is None and flops_cost is not None:
            stage_cfg = dataclasses.replace(stage_cfg, pack=dataclasses.replace(stage_cfg.pack, flops_cost=flops_cost))
        cfg = dataclasses.replace(stage_cfg, mixture={})  # a new mixture needs no new loader
        state, self._restored = self._restored, None
        if self.loader is not None and state is None and cfg != self.cfg:
            state = self.loader.state_dict()
        if self.loader is None or cfg != self.cfg or state is not None:
            if self.loader is not None:
                self.loader.close()
            changed = (cfg.image, cfg.system_prompt) != (self.base.image, self.base.system_prompt)
            encoder = build_encoder(self.setup.tokenizer, cfg, self.model) if changed else None
            stream = build_stream(self.setup, cfg, self.seed, self.rank, self.world_size, encoder)
            self.loader = build_loader(self.faults.wrap_stream(stream), cfg.num_workers)
            self.cfg = cfg
            if state is not None:
                try:
                    self.loader.load_state_dict(state)
                except ValueError as exc:
                    raise ValueError(
                        f"stage {stage.name!r}: the data loader cannot continue under this stage's data overrides "
                        f"({exc})"
                    ) from exc
        self.loader.set_weights(dict(stage_cfg.mixture) or None)

    def next_packs(self, count: int) -> list[PackedBatch]:
        assert self.loader is not None, "enter() a stage first"
        return [next(self.loader) for _ in range(count)]

    @property
    def budgets(self) -> tuple[int, int]:
        assert self.cfg is not None, "enter() a stage first"
        return self.cfg.pack.llm_budget, self.cfg.pack.vit_budget

    def state_dict(self) -> dict[str, Any]:
        assert self.loader is not None, "enter() a stage first"
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` when the next stage is entered."""
        self._restored = state

    def skipped(self) -> dict[str, int]:
        return self.loader.skipped() if self.loader is not None else {}

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
