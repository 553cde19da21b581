"""Engines: `single` (one process), `deepspeed` (ZeRO 0-3 under torchrun) and `fsdp2` (PyTorch FSDP2 under torchrun),
made by `build_engine`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlm_train.model.vlm import VLM
from vlm_train.train.config import EngineConfig, TrainConfig
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engines.base import Engine, overlay, plain_state, use_bf16
from vlm_train.train.engines.single import SingleEngine

__all__ = [
    "ENGINES",
    "Engine",
    "EngineChoice",
    "SingleEngine",
    "build_engine",
    "overlay",
    "plain_state",
    "resolve_engine",
]

ENGINES = ("auto", "single", "deepspeed", "fsdp2")


@dataclass(frozen=True)
class EngineChoice:
    """The engine a launch runs, known before it is built (what checkpoints record and kinds check)."""

    name: str  # single | deepspeed | fsdp2
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage; None for the other engines

    @property
    def shards_parameters(self) -> bool:
        """Each rank holds only a shard of every parameter (see Engine.shards_parameters)."""
        return self.zero_stage == 3 or self.name == "fsdp2"

    @property
    def builds_on_meta(self) -> bool:
        """The model is built on the meta device and materialised as this rank's shards (no rank holds it whole)."""
        return self.name == "fsdp2"

    @property
    def reshards_checkpoints(self) -> bool:
        """Its checkpoints are row shards that load at any world size (engines/shards.py)."""
        return self.name == "fsdp2"

    def describe(self) -> str:
        return self.name if self.zero_stage is None else f"{self.name} ZeRO-{self.zero_stage}"


def resolve_engine(cfg: EngineConfig, world_size: int, whole_weights: bool = False) -> EngineChoice:
    """The engine this launch runs. `auto` is the single engine in one process, and in several FSDP2, or DeepSpeed
    at engine.zero_stage when a stage needs whole weights on every rank (`whole_weights`: a draft stage's frozen
    target). FSDP2 is the default by measurement (docs/benchmarks.md, "Engines"): on 2 CPU ranks of a 495M model with
    activation checkpointing it needs 0.76x the memory per rank of ZeRO-2 at about its step time, where ZeRO-3 is
    killed for memory; it builds on the meta device, and its checkpoints resume at any world size."""
    if cfg.name not in ENGINES:
        raise ValueError(f"engine.name must be one of {ENGINES}, got {cfg.name!r}")
    name = cfg.name
    if name == "auto":
        name = "single" if world_size == 1 else "deepspeed" if whole_weights else "fsdp2"
    if name == "single" and world_size > 1:
        raise RuntimeError(
            f"engine=single trains in one process, but WORLD_SIZE={world_size}: launch one process, or leave "
            "engine at its default (auto), which trains data-parallel with FSDP2 under torchrun"
        )
    return EngineChoice(name, cfg.zero_stage if name == "deepspeed" else None)


def build_engine(
    cfg: EngineConfig,
    train: TrainConfig,
    model: VLM,
    make_model: Callable[[], VLM],
    device: torch.device,
    dist: DistInfo,
    whole_weights: bool = False,
) -> Engine:
    """The engine this launch runs (see resolve_engine); `make_model` builds a fresh model (ZeRO-3 needs one per
    stage)."""
    bf16 = use_bf16(cfg, device)
    name = resolve_engine(cfg, dist.world_size, whole_weights).name
    if name == "single":
        return SingleEngine(model, train, device, bf16)
    if name == "fsdp2":
        from vlm_train.train.engines.fsdp2 import FSDP2Engine

        return FSDP2Engine(cfg, train, model, device, dist, bf16)
    from vlm_train.train.engines.deepspeed_zero import DeepSpeedEngine  # imports deepspeed: only when asked for

    return DeepSpeedEngine(cfg, train, model, make_model, device, dist, bf16)
