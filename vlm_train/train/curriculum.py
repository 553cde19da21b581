"""Curriculum stages: what trains, in which parameter groups at which lr, and a stage's data and loss overrides."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch import nn

from vlm_train.data.config import DataConfig
from vlm_train.train.config import CurriculumConfig, LossConfig, StageConfig, TrainConfig
from vlm_train.train.loss import check_loss
from vlm_train.train.schedule import DECAY_SHAPES, SCHEDULES, lr_factor

OTHER_GROUP = "other"  # parameters that match no group of curriculum.groups
T = TypeVar("T")


def validate_curriculum(
    cfg: CurriculumConfig, model: nn.Module, loss: LossConfig | None = None, data: DataConfig | None = None
) -> None:
    """Clear errors for an empty curriculum, bad lengths and schedules, unknown groups, patterns matching nothing
    (what is particular to a stage's kind is checked by the kind: StageKind.check_stage)."""
    if not cfg.stages:
        raise ValueError("curriculum.stages is empty: a run needs at least one stage")
    names = [name for name, _ in model.named_parameters()]
    for group, patterns in cfg.groups.items():
        if not any(fnmatch.filter(names, p) for p in patterns):
            raise ValueError(f"curriculum.groups.{group}: patterns {list(patterns)} match no parameter")
    for index, stage in enumerate(cfg.stages):
        where = stage_where(index, stage)
        if (stage.steps > 0) == (stage.tokens > 0) or stage.steps < 0 or stage.tokens < 0:
            raise ValueError(
                f"{where}: set exactly one of steps and tokens to a positive number "
                f"(steps must be positive; got steps={stage.steps}, tokens={stage.tokens})"
            )
        if stage.schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule {stage.schedule!r} is not one of {SCHEDULES}")
        if stage.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"{where}: decay_shape {stage.decay_shape!r} is not one of {DECAY_SHAPES}")
        if stage.warmup_steps < 0:
            raise ValueError(f"{where}: warmup_steps must not be negative, got {stage.warmup_steps}")
        if not 0.0 <= stage.decay_fraction <= 1.0 or not 0.0 <= stage.min_lr_ratio <= 1.0:
            raise ValueError(f"{where}: decay_fraction and min_lr_ratio must be within [0, 1]")
        if stage.lr < 0 or any(v < 0 for v in stage.lr_scale.values()):
            raise ValueError(f"{where}: lr and lr_scale must not be negative")
        unknown = sorted(set(stage.lr_scale) - set(cfg.groups) - {OTHER_GROUP})
        if unknown:
            raise ValueError(
                f"{where}: lr_scale names unknown groups {unknown}; curriculum.groups has {sorted(cfg.groups)}"
            )
        for pattern in stage.trainable:
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"{where}: trainable pattern {pattern!r} matches no parameter (try vision.*, projector.*, llm.*)"
                )
        if loss is not None:
            check_loss(stage_loss(loss, stage, where), where)
        if data is not None:
            stage_data(data, stage, where).pack.budget()  # bad keys, types and budgets are errors now, not later


def stage_where(index: int, stage: StageConfig) -> str:
    """How errors name a stage: curriculum.stages.N (name)."""
    return f"curriculum.stages.{index} ({stage.name})"


def trained_outside(model: nn.Module, patterns: list[str], allowed: list[str]) -> list[str]:
    """The top-level modules (as `name.*`) whose parameters match `patterns` but none of `allowed`."""
    return sorted(
        {
            name.split(".")[0] + ".*"
            for name, _ in model.named_parameters()
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)
            and not any(fnmatch.fnmatchcase(name, a) for a in allowed)
        }
    )


def set_trainable(model: nn.Module, patterns: list[str], frozen: list[str] | None = None) -> list[nn.Parameter]:
    """Unfreeze the parameters whose names match any pattern (but not `frozen`) and freeze the rest; returns the
    trainable ones."""
    trainable = []
    for name, param in model.named_parameters():
        wanted = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(wanted and not any(fnmatch.fnmatchcase(name, f) for f in frozen or ()))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def group_of(name: str, groups: dict[str, list[str]]) -> str:
    for group, patterns in groups.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return group
    return OTHER_GROUP


def param_groups(model: nn.Module, stage: StageConfig, groups: dict[str, list[str]], train: TrainConfig) -> list[dict]:
    """Optimizer groups of the trainable parameters: one per named group, split by weight decay (norms and biases
    get none); each carries its `name` and `lr_scale`. Empty groups are left out."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((group_of(name, groups), param.ndim >= 2), []).append(param)
    result = []
    for (group, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        result.append(
            {
                "params": params,
                "name": group if decay else f"{group}/no_decay",
                "group": group,
                "lr_scale": float(stage.lr_scale.get(group, 1.0)),
                "weight_decay": train.weight_decay if decay else 0.0,
            }
        )
    return result


def group_lrs(stage: StageConfig, step_in_stage: int, tokens_in_stage: int, groups: list[dict]) -> dict[str, float]:
    """The lr of each optimizer group (by name) for the step about to run."""
    base = stage.lr * lr_factor(stage, step_in_stage, tokens_in_stage)
    return {g["name"]: base * g["lr_scale"] for g in groups}


# Data keys a stage may not change: the loader's shard split and the model's tokenizer are fixed for the run.
RUN_WIDE_DATA_KEYS = (
    "sources",
    "heldout_urls",
    "use_synthetic",
    "synthetic",
    "use_synthetic_video",
    "synthetic_video",
    "tokenizer",
    "num_workers",
    "shuffle_buffer",
    "allow_pipe",
)


def merge_partial(base: T, overrides: Mapping[str, Any], where: str) -> T:
    """`base` (a config dataclass) with the partial config `overrides` merged on, checked by the same dataclass."""
    if not overrides:
        return base
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.create(dict(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        key = str(exc.full_key or exc.key)
        near = difflib.get_close_matches(key, _keys(base), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"{where}.{key}: not a key of {type(base).__name__}{hint}") from None
    except ValidationError as exc:
        raise ValueError(f"{where}.{exc.full_key}: {exc.msg.splitlines()[0]}") from None


def _keys(config: Any, prefix: str = "") -> list[str]:
    """Every key path of a config dataclass (pack.llm_budget, image.token_drop.prob, ...)."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(value):
            keys += _keys(value, f"{prefix}{f.name}.")
    return keys


def stage_loss(loss: LossConfig, stage: StageConfig, where: str = "stage") -> LossConfig:
    """The run's loss config with the stage's `loss` overrides."""
    return merge_partial(loss, stage.loss, f"{where}.loss")


def stage_data(data: DataConfig, stage: StageConfig, where: str = "stage") -> DataConfig:
    """The run's data config with the stage's `data` overrides merged on (pack budgets, image settings, ...)."""
    fixed = sorted(set(stage.data) & set(RUN_WIDE_DATA_KEYS))
    if fixed:
        raise ValueError(
            f"{where}.data: {fixed} cannot change within a run (the loader's shards and state depend on them); "
            "a stage changes the mixture, pack budgets, image or video settings or system prompt"
        )
    if "mixture" in stage.data:  # a stage's mixture replaces the run's: the sources it does not name drop out
        data = dataclasses.replace(data, mixture={})
    return merge_partial(data, stage.data, f"{where}.data")
