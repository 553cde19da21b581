"""The engine interface: forward, backward and the optimizer step of one rank, and the optimizer's state.

An engine owns the trainable model and its optimizer. A curriculum stage changes what trains, so each stage
starts a new optimizer (`start_stage`). The loss handed to `backward` is this rank's share of the global step
loss: the shares of all micro-batches of all ranks add up to the step loss, so gradients are summed, not averaged.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_train.model.vlm import VLM
from vlm_train.train.config import EngineConfig, TrainConfig
from vlm_train.train.model_files import write_model_files
from vlm_train.train.optim import GuardedAdamW, StepReport

MakeGroups = Callable[[nn.Module], list[dict]]  # sets what trains in the module, returns its optimizer groups


def use_bf16(cfg: EngineConfig, device: torch.device) -> bool:
    """engine.bf16: auto is on with a GPU, off on the CPU; true is on anywhere. On the CPU bf16 is for testing the
    bf16 path (torch's CPU autocast, DeepSpeed's bf16 optimizer) before GPU time is spent, not for speed."""
    value = str(cfg.bf16).lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"engine.bf16 must be auto, true or false, got {cfg.bf16!r}")
    return value == "true" or (value == "auto" and device.type == "cuda")


def make_optimizer(groups: list[dict], train: TrainConfig, clip: float | None) -> GuardedAdamW:
    # torch's fused AdamW (one kernel over all parameters, CPU or CUDA) where every parameter allows it: on the CPU
    # it took the tiny default model's update from 5.4 to 2.4 ms; the per-parameter loop otherwise.
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return GuardedAdamW(
        groups,
        clip=clip,
        lr=0.0,
        betas=tuple(train.adam_betas),
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        fused=fused,
    )


def plain_state(obj: Any) -> Any:
    """What of an optimizer state can be saved without pickling objects: tensors, numbers, strings, containers.

    Other values (DeepSpeed's loss scaler, enums, fragment addresses) are rebuilt by the live optimizer."""
    if torch.is_tensor(obj) or obj is None or type(obj) in (bool, int, float, str):  # not subclasses (enums)
        return obj
    if isinstance(obj, dict):
        kept = {k: plain_state(v) for k, v in obj.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        kept = [plain_state(v) for v in obj]
        return _DROP if any(v is _DROP for v in kept) else kept
    return _DROP


_DROP = object()


def overlay(live: Any, saved: Any) -> Any:
    """The live state with every value the saved state has."""
    if isinstance(live, dict) and isinstance(saved, dict):
        return {**live, **{k: overlay(live.get(k), v) for k, v in saved.items()}}
    return saved


class Engine(ABC):
    """Forward, backward and step of one rank; see SingleEngine and DeepSpeedEngine.

    As a checkpoint part, its state is this rank's optimizer state and the index of the stage it belongs to. A
    restored state is applied when that stage's optimizer is made (`start_stage`), and dropped if the run goes
    on in a later stage: every stage starts a fresh optimizer.
    """

    name: str  # "single" or "deepspeed"
    model: VLM  # the unwrapped model (its cfg, its LM head)
    device: torch.device
    bf16: bool
    # Whether each rank holds only a shard of every parameter, gathered per call (DeepSpeed ZeRO-3): a weight then
    # cannot be read whole outside a forward (a fused loss's head), and the calls must match across ranks.
    shards_parameters: bool = False
    # Whether the LM head's weight is whole between the model's forward and its backward, so the loss may call the
    # head as often as it likes (chunk by chunk): not under ZeRO-3, which gathers it per call; under FSDP2 the root
    # stays gathered until its backward.
    head_whole_after_forward: bool = True

    def __init__(self) -> None:
        self.stage_index = -1
        self._restored: dict[str, Any] | None = None

    # ---- a stage's optimizer ------------------------------------------------------------------------------------

    def start_stage(self, make_groups: MakeGroups, stage_index: int) -> None:
        """A new optimizer over the groups `make_groups` makes trainable; the restored state if it is this stage's."""
        self._start(make_groups)
        self.stage_index = stage_index
        restored, self._restored = self._restored, None
        if restored is not None and int(restored["stage"]) == stage_index:
            self.load_optimizer_state(restored["optimizer"])

    @abstractmethod
    def _start(self, make_groups: MakeGroups) -> None: ...

    @property
    @abstractmethod
    def optimizer(self) -> GuardedAdamW | None: ...

    def describe(self) -> str:
        """The engine as the run's log names it."""
        return self.name

    def trainable_parameters(self) -> int:
        """The number of trainable parameters of the whole model (not of this rank's shard)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def param_groups(self) -> list[dict]:
        """The current stage's optimizer groups (each named after its parameter group)."""
        assert self.optimizer is not None, "start_stage() first"
        return self.optimizer.param_groups

    def set_lrs(self, lrs: dict[str, float]) -> None:
        for group in self.param_groups():
            group["lr"] = lrs[group["name"]]

    # ---- one step ------------------------------------------------------------------------------------------------

    @abstractmethod
    def forward_module(self) -> nn.Module:
        """What to call on a pack: the model, or the wrapper that must see the forward (DeepSpeed)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed's bf16 keeps bf16 weights (and fp32 masters) instead

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, skip: bool) -> StepReport:
        """The optimizer step of the accumulated gradients, or none when `skip`; what it did."""

    @abstractmethod
    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's reduced gradient (between the last backward and step; for tests)."""

    # ---- weights and state ---------------------------------------------------------------------------------------

    @abstractmethod
    def export_model(self) -> VLM | None:
        """A plain model with the full weights on rank 0 (None on other ranks); collective under ZeRO-3."""

    def save_weights(self, folder: Path) -> None:
        """Write the model's weights into a checkpoint folder (call on every rank): the whole weights from rank 0."""
        model = self.export_model()
        if model is not None:
            write_model_files(model, folder)

    def inference(self) -> contextlib.AbstractContextManager:
        """The model ready for evaluation and generation outside the training step (call on every rank)."""
        return contextlib.nullcontext()

    @abstractmethod
    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state: tensors and numbers only (loads with torch.load(weights_only=True))."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage_index, "optimizer": self.optimizer_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state

    @abstractmethod
    def close(self) -> None: ...
