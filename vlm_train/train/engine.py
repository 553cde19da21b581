"""Engines run forward, backward and the optimizer step: `single` (one process) and `deepspeed` (ZeRO 0-3).

An engine owns the trainable model and its optimizer. A curriculum stage changes what trains, so each stage
starts a new optimizer (`start_stage`). The loss handed to `backward` is this rank's share of the global step
loss: the shares of all micro-batches of all ranks add up to the step loss, so gradients are summed, not averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_train.model.vlm import VLM
from vlm_train.train.checkpoint import rank_file
from vlm_train.train.config import EngineConfig, TrainConfig
from vlm_train.train.distributed import DistInfo
from vlm_train.train.optim import GuardedAdamW


def use_bf16(cfg: EngineConfig, device: torch.device) -> bool:
    """engine.bf16: auto is on with a GPU, off on the CPU."""
    value = str(cfg.bf16).lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"engine.bf16 must be auto, true or false, got {cfg.bf16!r}")
    if value == "true" and device.type != "cuda":
        raise ValueError("engine.bf16=true needs a GPU (bf16 on CPU is slow and not what the tests check)")
    return device.type == "cuda" and value != "false"


def make_optimizer(groups: list[dict], train: TrainConfig, clip: float | None) -> GuardedAdamW:
    return GuardedAdamW(
        groups, clip=clip, lr=0.0, betas=tuple(train.adam_betas), eps=train.adam_eps, weight_decay=train.weight_decay
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


class Engine:
    """The interface the trainer uses; see SingleEngine and DeepSpeedEngine."""

    model: VLM  # the unwrapped model (its cfg, its LM head)
    device: torch.device
    bf16: bool
    zero_stage: int = -1  # DeepSpeed's ZeRO stage; -1 for the single engine

    def start_stage(self, make_groups: Callable[[nn.Module], list[dict]]) -> None: ...
    def forward_module(self) -> nn.Module: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, skip: bool) -> tuple[float, bool]: ...  # (grad norm, whether the update was applied)
    def full_grads(self) -> dict[str, torch.Tensor]: ...
    def export_model(self) -> VLM | None: ...
    def save_optimizer(self, folder: Path) -> None: ...
    def load_optimizer(self, folder: Path) -> None: ...
    def close(self) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed's bf16 keeps bf16 weights (and fp32 masters) instead

    def param_groups(self) -> list[dict]:
        """The current stage's optimizer groups (each named after its parameter group)."""
        optimizer = getattr(self, "optimizer", None)
        assert optimizer is not None, "start_stage() first"
        return optimizer.param_groups

    def set_lrs(self, lrs: dict[str, float]) -> None:
        for group in self.param_groups():
            group["lr"] = lrs[group["name"]]


class SingleEngine(Engine):
    """One process, CPU or one GPU; bf16 autocast on GPU."""

    def __init__(self, model: VLM, train: TrainConfig, device: torch.device, bf16: bool):
        self.model = model.to(device)
        self.train = train
        self.device = device
        self.bf16 = bf16
        self.optimizer: GuardedAdamW | None = None

    def start_stage(self, make_groups: Callable[[nn.Module], list[dict]]) -> None:
        """A new optimizer over the groups `make_groups` sets trainable in the model."""
        self.optimizer = make_optimizer(make_groups(self.model), self.train, clip=self.train.grad_clip)

    def forward_module(self) -> nn.Module:
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool) -> tuple[float, bool]:
        assert self.optimizer is not None
        self.optimizer.reset()
        self.optimizer.skip_next = skip
        self.optimizer.step()
        self.optimizer.skip_next = False
        self.optimizer.zero_grad(set_to_none=True)
        return self.optimizer.last_norm, not self.optimizer.last_skipped

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def export_model(self) -> VLM:
        return self.model

    def save_optimizer(self, folder: Path) -> None:
        assert self.optimizer is not None
        torch.save(plain_state(self.optimizer.state_dict()), rank_file(folder, "optimizer", 0, "pt"))

    def load_optimizer(self, folder: Path) -> None:
        assert self.optimizer is not None
        saved = torch.load(rank_file(folder, "optimizer", 0, "pt"), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(overlay(self.optimizer.state_dict(), saved))

    def close(self) -> None:
        self.optimizer = None


def build_engine(
    cfg: EngineConfig,
    train: TrainConfig,
    model: VLM,
    make_model: Callable[[], VLM],
    device: torch.device,
    dist: DistInfo,
) -> Engine:
    """The engine engine.name asks for; `make_model` builds a fresh model (ZeRO-3 needs one per stage)."""
    bf16 = use_bf16(cfg, device)
    if cfg.name == "single":
        if dist.world_size > 1:
            raise RuntimeError(
                f"engine=single trains in one process, but WORLD_SIZE={dist.world_size}: launch one "
                "process, or use engine=deepspeed under torchrun"
            )
        return SingleEngine(model, train, device, bf16)
    if cfg.name == "deepspeed":
        from vlm_train.train.deepspeed_engine import DeepSpeedEngine  # imports deepspeed: only when asked for

        return DeepSpeedEngine(cfg, train, model, make_model, device, dist, bf16)
    raise ValueError(f"engine.name must be single or deepspeed, got {cfg.name!r}")
