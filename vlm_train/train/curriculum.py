"""Curriculum stages: which parameters train, with what optimizer and learning-rate schedule."""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from vlm_train.train.config import CurriculumConfig, StageConfig, TrainConfig

SCHEDULES = ("cosine", "constant")


def validate_curriculum(cfg: CurriculumConfig, model: nn.Module) -> None:
    """Clear errors for an empty curriculum, bad lengths, unknown schedules and patterns that match nothing."""
    if not cfg.stages:
        raise ValueError("curriculum.stages is empty: a run needs at least one stage")
    names = [name for name, _ in model.named_parameters()]
    for index, stage in enumerate(cfg.stages):
        where = f"curriculum.stages.{index} ({stage.name})"
        if stage.steps <= 0:
            raise ValueError(f"{where}: steps must be positive, got {stage.steps}")
        if stage.schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule {stage.schedule!r} is not one of {SCHEDULES}")
        if stage.warmup_steps < 0:
            raise ValueError(f"{where}: warmup_steps must not be negative, got {stage.warmup_steps}")
        for pattern in stage.trainable:
            if not fnmatch.filter(names, pattern):
                raise ValueError(f"{where}: trainable pattern {pattern!r} matches no parameter (try vision.*, projector.*, llm.*)")


def set_trainable(model: nn.Module, patterns: list[str]) -> list[nn.Parameter]:
    """Unfreeze the parameters whose names match any pattern and freeze the rest; returns the trainable ones."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def lr_factor(stage: StageConfig, step_in_stage: int) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio, over the stage's own steps.

    Warm-up is capped at the stage length, so shortening a stage from the command line needs no second override.
    """
    warmup = min(stage.warmup_steps, stage.steps)
    if step_in_stage < warmup:
        return (step_in_stage + 1) / warmup
    if stage.schedule == "constant":
        return 1.0
    decay_steps = max(stage.steps - warmup, 1)
    progress = min((step_in_stage - warmup) / decay_steps, 1.0)
    return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[nn.Parameter], stage: StageConfig, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the stage's trainable parameters; norms and biases get no weight decay."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=stage.lr, betas=tuple(train.adam_betas), fused=None
    )


def set_lr(optimizer: torch.optim.Optimizer, stage: StageConfig, step_in_stage: int) -> float:
    lr = stage.lr * lr_factor(stage, step_in_stage)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
