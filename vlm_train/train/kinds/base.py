"""The interface of a stage kind: what one kind of curriculum stage (a stage's `kind:`) does differently.

The trainer runs every stage the same way: it builds the run, then for each stage makes an optimizer over what the
stage trains, reads packs, runs the step, counts FLOPs, evaluates when due and saves. Whatever depends on the kind,
it asks the stage's kind:

- building the run: the run-wide settings it checks or adjusts (`configure`), the data or the model it provides
  instead of the configured ones (`data_setup`, `base_model`: a draft's frozen target), what it attaches to the VLM
  (`attach`: heads, a draft; each attached module names the checkpoint file it is saved in), and what it checks of
  each of its stages and of the engine (`check_stage`, `check_engine`);
- a stage: what trains (`trainable`), its pack cost (`pack_cost`, what the packer balances), what happens when a
  stage of it starts (`enter`), its step (`forward_backward`, one signature for all kinds: the engine, this rank's
  packs, the step's injected faults), the FLOPs that count for MFU (`flops`);
- evaluation: when its evaluator runs (`eval_due`), what it measures (`evaluate`) and what the run's summary gets
  at the end (`final`).

A kind is one module in this package with a StageKind subclass, registered by one line in `KINDS`
(kinds/__init__.py). Engine specifics stay in the engines: a kind asks the engine (`shards_parameters`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlm_train.data.batch import PackedBatch
from vlm_train.data.pack_cost import FlopsCost
from vlm_train.model.attachments import attached
from vlm_train.model.vlm import VLM
from vlm_train.train.builders import DataSetup
from vlm_train.train.config import Config, StageConfig
from vlm_train.train.curriculum import set_trainable
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engines import Engine, EngineChoice
from vlm_train.train.guards import StepFaults
from vlm_train.train.metrics import MetricsLogger
from vlm_train.train.step import StepResult


@dataclass
class RunContext:
    """What a kind reads of its run: the config (which `configure` may adjust before the data and the model are
    built), this process, the run folder, and the run's data once it is built."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    run_dir: Path
    setup: DataSetup | None = None  # set by the trainer once the data is built
    metrics: MetricsLogger | None = None  # the run's metrics sinks, for what is not a step's scalar (W&B tables)

    @property
    def data(self) -> DataSetup:
        assert self.setup is not None, "the run's data is not built yet"
        return self.setup


class StageKind:
    """One kind of stage; one instance per kind that the curriculum uses, for the whole run (see the module doc)."""

    name: ClassVar[str]
    attachment: ClassVar[str] = ""  # the name of the module this kind attaches to the VLM and trains, if any
    # Whether its stages need whole weights on every rank (a frozen model run outside the engine): engine=auto then
    # picks an engine that keeps them whole (DeepSpeed) in several processes.
    needs_whole_weights: ClassVar[bool] = False

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    # ---- building the run ----------------------------------------------------------------------------------------

    def configure(self) -> None:
        """Check this kind's run-wide settings; adjust the run's config before the data and the model are built."""

    def data_setup(self) -> DataSetup | None:
        """The run's data when this kind provides it (None: the data config's)."""
        return None

    def base_model(self, load: bool) -> VLM | None:
        """The VLM when this kind provides it (None: built from the model config); `load=False`: its weights are
        about to be replaced (a checkpoint, a fresh copy for the engine)."""
        return None

    def attach(self, model: VLM) -> None:
        """Attach what this kind trains beside the VLM (model/attachments.py)."""

    def ready(self) -> None:
        """The run's data and model are built: make what depends on them (evaluators)."""

    def check_stage(self, stage: StageConfig, where: str, model: VLM) -> None:
        """Clear errors for a stage of this kind that cannot train on `model` (`where` names the stage)."""

    def check_engine(self, engine: EngineChoice) -> None:
        """Clear errors when the launch's engine cannot run this kind's stages (before it is built)."""

    # ---- a stage -------------------------------------------------------------------------------------------------

    def trainable(self, stage: StageConfig) -> tuple[list[str], list[str]]:
        """(parameter patterns that train, patterns that stay frozen) in a stage of this kind."""
        return list(stage.trainable), []

    def set_trainable(self, model: nn.Module, stage: StageConfig) -> list[nn.Parameter]:
        """Set what trains in `stage`; a module attached by another kind never trains here. Returns the trainable
        parameters."""
        patterns, frozen = self.trainable(stage)
        others = [f"{part.name}.*" for part in attached(model) if part.name != self.attachment]
        params = set_trainable(model, patterns, frozen=frozen + others)
        self.counting(model)
        return params

    def counting(self, model: nn.Module) -> None:
        """Note what the stage trains, for `flops` (called by set_trainable)."""

    def pack_cost(self, cost: FlopsCost | None) -> FlopsCost | None:
        """What the packer balances packs by in a stage of this kind, from the model's training FLOPs per sample."""
        return cost

    def enter(self, stage: StageConfig, model: VLM, fresh: bool) -> None:
        """A stage of this kind starts (`fresh`: at its first step; else resumed inside it)."""

    def forward_backward(self, engine: Engine, packs: list[PackedBatch], faults: StepFaults) -> StepResult:
        """Forward and backward of this rank's packs for one optimizer step (the update is the trainer's)."""
        raise NotImplementedError(f"stage kind {self.name!r} has no step")

    def flops(self, pack: PackedBatch) -> float:
        """The training FLOPs of a pack that count for MFU in the current stage."""
        return 0.0

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def eval_due(self, step: int, stage_done: bool) -> bool:
        """Whether this kind's evaluator runs after `step`."""
        return False

    def evaluate(self, model: VLM, step: int) -> dict[str, Any]:
        """Held-out figures of the model as it is now (on every rank), for the step's metrics."""
        return {}

    def final(self, model: VLM, step: int) -> dict[str, Any]:
        """What the run's summary gets from this kind at the end (on every rank; files and reports from rank 0)."""
        return {}
