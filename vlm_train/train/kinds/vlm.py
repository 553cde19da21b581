"""`kind: vlm`: the VLM's weighted token loss (the default kind), evaluated by held-out loss, caption exact match
and grounding accuracy."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from vlm_train.data.batch import PackedBatch
from vlm_train.model.flops import TrainedParts, pack_flops
from vlm_train.model.vlm import VLM
from vlm_train.train.config import LossConfig, StageConfig
from vlm_train.train.curriculum import stage_loss
from vlm_train.train.engines import Engine
from vlm_train.train.evaluator import (
    PREDICTIONS_FILE,
    HeldoutEvaluator,
    HeldoutResult,
    print_report,
    table_rows,
    write_predictions,
)
from vlm_train.train.guards import StepFaults
from vlm_train.train.kinds.base import StageKind
from vlm_train.train.step import LossGroups, StepResult, forward_backward

log = logging.getLogger("vlm_train")


def figure(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class VLMKind(StageKind):
    """The token loss of the stage's `loss` policy over the trainable patterns of the stage."""

    name = "vlm"

    def ready(self) -> None:
        cfg, setup = self.ctx.cfg, self.ctx.data
        self.groups = LossGroups(tuple(s.name for s in setup.sources))  # the same on every rank
        self.policy: LossConfig = cfg.loss
        self.parts = TrainedParts()
        self.evaluator: HeldoutEvaluator | None = None
        wanted = cfg.eval.enabled or cfg.eval.interval > 0 or cfg.eval.at_stage_end
        if wanted and setup.heldout_urls:
            data = cfg.data  # held-out videos are sampled as the training videos are (data.video)
            self.evaluator = HeldoutEvaluator.from_setup(setup, cfg.eval, data.image.max_decode_pixels, data.video)
        self.last: tuple[int, HeldoutResult] | None = None

    def counting(self, model: nn.Module) -> None:
        self.parts = TrainedParts.of(model)  # what runs backward, for the stage's MFU
        self.model_cfg = model.cfg

    def enter(self, stage: StageConfig, model: VLM, fresh: bool) -> None:
        self.policy = stage_loss(self.ctx.cfg.loss, stage)

    def forward_backward(self, engine: Engine, packs: list[PackedBatch], faults: StepFaults) -> StepResult:
        return forward_backward(engine, packs, self.policy, faults, self.groups)

    def flops(self, pack: PackedBatch) -> float:
        return pack_flops(self.model_cfg, pack).trained(self.parts)

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def eval_due(self, step: int, stage_done: bool) -> bool:
        interval = self.ctx.cfg.eval.interval
        stage_end = self.ctx.cfg.eval.at_stage_end and stage_done
        return self.evaluator is not None and ((interval > 0 and step % interval == 0) or stage_end)

    def heldout(self, model: VLM, step: int) -> HeldoutResult:
        """The held-out result of the model at `step` (once per step: a final evaluation right after a due one
        reuses it)."""
        assert self.evaluator is not None, "no held-out data: set data.heldout_urls"
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        result = self.evaluator.evaluate(model, self.ctx.device)
        self.last = (step, result)
        if self.ctx.metrics is not None:
            self.ctx.metrics.log_examples(step, table_rows(result))  # the examples with their pictures, on W&B
        m = result.metrics
        log.info(
            "eval at step %d: heldout_loss %s | caption exact match %s | grounding acc %s | %.1fs",
            step,
            figure(m.get("heldout_loss")),
            figure(m.get("heldout_exact_match")),
            figure(m.get("heldout_grounding_acc")),
            result.seconds,
        )
        return result

    def evaluate(self, model: VLM, step: int) -> dict[str, Any]:
        return dict(self.heldout(model, step).metrics)

    def final(self, model: VLM, step: int) -> dict[str, Any]:
        """The final held-out evaluation (eval.enabled); rank 0 writes the predictions and prints the report."""
        if not (self.ctx.cfg.eval.enabled and self.evaluator is not None):
            return {}
        result = self.heldout(model, step)
        if self.ctx.dist.is_main:
            write_predictions(result.predictions, self.ctx.run_dir / PREDICTIONS_FILE)
            print_report(result, self.ctx.cfg.eval.show_examples)
        return dict(result.metrics)
