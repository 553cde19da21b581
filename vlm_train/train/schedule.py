"""Learning-rate schedules within a stage and the run's position in the curriculum (steps or tokens)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vlm_train.train.config import StageConfig

SCHEDULES = ("constant", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def stage_progress(stage: StageConfig, step_in_stage: int, tokens_in_stage: int) -> float:
    """How far into the stage a step starts, in [0, 1]: by steps, or by tokens for a stage measured in tokens."""
    if stage.tokens > 0:
        return min(tokens_in_stage / stage.tokens, 1.0)
    return min(step_in_stage / max(stage.steps, 1), 1.0)


def _decay(shape: str, t: float) -> float:
    """1 -> 0 as t goes 0 -> 1."""
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if shape == "sqrt":
        return 1.0 - math.sqrt(t)
    return 1.0 - t


def lr_factor(stage: StageConfig, step_in_stage: int, tokens_in_stage: int = 0) -> float:
    """Multiplier of the stage's lr for the step about to run: linear warm-up (in steps), then the schedule.

    Warm-up is capped at a step-measured stage's length, so shortening a stage on the command line needs no
    second override. Cosine decays over the rest of the stage; WSD stays at 1 until its last decay_fraction.
    """
    warmup = min(stage.warmup_steps, stage.steps) if stage.steps > 0 else stage.warmup_steps
    if step_in_stage < warmup:
        return (step_in_stage + 1) / warmup
    if stage.schedule == "constant":
        return 1.0
    floor = stage.min_lr_ratio
    if stage.tokens > 0:
        progress = stage_progress(stage, step_in_stage, tokens_in_stage)
    else:
        progress = min((step_in_stage - warmup) / max(stage.steps - warmup, 1), 1.0)
    if stage.schedule == "cosine":
        return floor + (1.0 - floor) * _decay("cosine", progress)
    # wsd: stable, then the last decay_fraction of the stage decays; a step-measured stage ends on the floor.
    if stage.tokens == 0:
        decay_steps = round(stage.decay_fraction * stage.steps)
        t = (step_in_stage - (stage.steps - decay_steps) + 1) / decay_steps if decay_steps else 0.0
    else:
        t = (progress - (1.0 - stage.decay_fraction)) / max(stage.decay_fraction, 1e-12)
    if t <= 0:
        return 1.0
    return floor + (1.0 - floor) * _decay(stage.decay_shape, min(t, 1.0))


@dataclass
class Position:
    """Where the run is: the optimizer step done last, the stage, and how far into it (saved with checkpoints)."""

    step: int = 0  # optimizer steps done
    stage: int = 0  # index of the current stage
    step_in_stage: int = 0
    tokens_in_stage: int = 0  # LLM tokens of every rank
    tokens: int = 0  # LLM tokens of the whole run

    def stage_done(self, stage: StageConfig) -> bool:
        if stage.tokens > 0:
            return self.tokens_in_stage >= stage.tokens
        return self.step_in_stage >= stage.steps

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.step_in_stage += 1
        self.tokens_in_stage += tokens
        self.tokens += tokens

    def next_stage(self) -> None:
        self.stage += 1
        self.step_in_stage = 0
        self.tokens_in_stage = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def estimate_total_steps(stages: list[StageConfig], position: Position, tokens_per_step: float) -> int:
    """Steps of the whole curriculum: the steps done plus those left, estimated from tokens per step where a stage
    is measured in tokens."""
    left = 0
    for index in range(position.stage, len(stages)):
        stage = stages[index]
        current = index == position.stage
        if stage.tokens > 0:
            tokens = stage.tokens - (position.tokens_in_stage if current else 0)
            left += math.ceil(max(tokens, 0) / max(tokens_per_step, 1.0))
        else:
            left += stage.steps - (position.step_in_stage if current else 0)
    return position.step + max(left, 0)
