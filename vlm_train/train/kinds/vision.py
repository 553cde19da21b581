"""`kind: vision`: the vision tower alone, with `vision_pretrain`'s objectives (sigmoid contrastive, multi-label)
through its heads (pooling, projections, text tower: attached to the VLM, saved in vision_heads.safetensors),
evaluated by zero-shot retrieval and label accuracy. See docs/vision_stage.md."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from vlm_train.data.batch import PackedBatch
from vlm_train.data.pack_cost import FlopsCost
from vlm_train.model.flops import TrainedParts, pack_flops
from vlm_train.model.vision_heads import HEADS_ATTR, heads_of
from vlm_train.model.vlm import VLM
from vlm_train.train.builders import add_vision_heads
from vlm_train.train.config import StageConfig
from vlm_train.train.curriculum import trained_outside
from vlm_train.train.engines import Engine
from vlm_train.train.guards import StepFaults
from vlm_train.train.kinds.base import StageKind
from vlm_train.train.kinds.vlm import figure
from vlm_train.train.step import StepResult
from vlm_train.train.vision_eval import VisionEvaluator
from vlm_train.train.vision_objective import LabelVocabulary, check_vision_pretrain
from vlm_train.train.vision_step import vision_forward_backward

log = logging.getLogger("vlm_train")


class VisionKind(StageKind):
    """Only the tower runs (and the heads, whose FLOPs are not counted)."""

    name = "vision"
    attachment = HEADS_ATTR

    def configure(self) -> None:
        check_vision_pretrain(self.ctx.cfg.vision_pretrain)
        self.vocab = LabelVocabulary(self.ctx.cfg.vision_pretrain.labels)
        self.parts = TrainedParts(projector=False, llm=False, lm_head=False)
        self.last: dict[str, Any] = {}

    def attach(self, model: VLM) -> None:
        add_vision_heads(model, self.ctx.cfg.vision_pretrain)

    def ready(self) -> None:
        setup, cfg = self.ctx.data, self.ctx.cfg
        self.evaluator: VisionEvaluator | None = None
        if setup.heldout_urls:
            max_pixels = cfg.data.image.max_decode_pixels
            self.evaluator = VisionEvaluator(setup.heldout_urls, setup.encoder, cfg.eval, max_pixels, self.vocab)

    def check_stage(self, stage: StageConfig, where: str, model: VLM) -> None:
        """A vision stage trains only what it runs: the tower (and the LLM when it is the text tower)."""
        if heads_of(model) is None:
            raise ValueError(f"{where}: a vision stage needs the vision heads attached (VisionKind.attach)")
        runs = ["vision.*"] + (["llm.*"] if self.ctx.cfg.vision_pretrain.heads.text_tower == "llm" else [])
        idle = trained_outside(model, list(stage.trainable), [*runs, HEADS_ATTR + ".*"])
        if idle:
            raise ValueError(
                f"{where}: a vision stage runs {runs} (and its heads) only, but trainable {list(stage.trainable)} also "
                f"matches {idle}: name what it trains, e.g. [vision.*]"
            )

    def trainable(self, stage: StageConfig) -> tuple[list[str], list[str]]:
        return [*stage.trainable, HEADS_ATTR + ".*"], []

    def counting(self, model: nn.Module) -> None:
        self.parts = TrainedParts(vision=TrainedParts.of(model).vision, projector=False, llm=False, lm_head=False)
        self.model_cfg = model.cfg

    def pack_cost(self, cost: FlopsCost | None) -> FlopsCost | None:
        """The tower's FLOPs only: the LLM and the projector do not run."""
        if cost is None:
            return None
        return dataclasses.replace(cost, token=0, token_pair=0, supervised=0, unit=0)

    def forward_backward(self, engine: Engine, packs: list[PackedBatch], faults: StepFaults) -> StepResult:
        dist, image_pad = self.ctx.dist, self.ctx.data.encoder.special.image_pad
        cfg = self.ctx.cfg.vision_pretrain
        return vision_forward_backward(engine, packs, cfg, self.vocab, image_pad, dist.rank, dist.world_size, faults)

    def flops(self, pack: PackedBatch) -> float:
        flops = pack_flops(self.model_cfg, pack)
        return dataclasses.replace(flops, projector=0, llm=0, lm_head=0, llm_attention=0).trained(self.parts)

    # ---- evaluation: every eval.interval steps and at the end of every vision stage --------------------------------

    def eval_due(self, step: int, stage_done: bool) -> bool:
        interval = self.ctx.cfg.eval.interval
        return self.evaluator is not None and ((interval > 0 and step % interval == 0) or stage_done)

    def evaluate(self, model: VLM, step: int) -> dict[str, Any]:
        assert self.evaluator is not None, "no held-out data: set data.heldout_urls"
        metrics = self.evaluator.evaluate(model, self.ctx.device)
        log.info(
            "vision eval at step %d: zero-shot retrieval top-1 %s | label exact %s | label acc %s | %.1fs",
            step,
            figure(metrics.get("vision/heldout_retrieval_top1")),
            figure(metrics.get("vision/heldout_label_exact")),
            figure(metrics.get("vision/heldout_label_acc")),
            metrics["vision/heldout_seconds"],
        )
        self.last = metrics
        return metrics

    def final(self, model: VLM, step: int) -> dict[str, Any]:
        return dict(self.last)  # the last vision stage's figures (the VLM's own are the vlm kind's)
