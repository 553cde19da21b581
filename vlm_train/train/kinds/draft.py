"""`kind: draft`: an Eagle3 draft (attached to the VLM, saved in draft.safetensors) trained against the frozen VLM
with `eagle3`'s training-time test. The target is the run's own VLM, `eagle3.target` (our run or a Hugging Face
Qwen2.5-VL), or, offline, the hidden states stored in `eagle3.offline`. See docs/draft_models.md."""

from __future__ import annotations

import dataclasses
import logging

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.model.draft import DRAFT_ATTR, draft_of
from vlm_train.model.vlm import VLM
from vlm_train.train.builders import DataSetup, add_draft, build_stream
from vlm_train.train.config import StageConfig
from vlm_train.train.curriculum import stage_data, trained_outside
from vlm_train.train.draft_objective import check_eagle3, choose_vocabulary
from vlm_train.train.draft_offline import OfflineTarget, offline_model, open_offline
from vlm_train.train.draft_step import draft_forward_backward
from vlm_train.train.draft_target import load_target, target_model_config
from vlm_train.train.engines import Engine, EngineChoice
from vlm_train.train.guards import StepFaults
from vlm_train.train.kinds.base import StageKind
from vlm_train.train.step import StepResult

log = logging.getLogger("vlm_train")
DRAFT_FROZEN = DRAFT_ATTR + ".embed_tokens.*"  # the draft's copy of the target's embedding never trains


class DraftKind(StageKind):
    """The VLM is frozen (and not evaluated: its figures do not change); the draft's FLOPs are not counted in MFU."""

    name = "draft"
    attachment = DRAFT_ATTR
    needs_whole_weights = True  # the frozen target runs outside the engine

    def configure(self) -> None:
        """Check `eagle3`; the run's model config becomes the target's, so that the data is built for it."""
        cfg = self.ctx.cfg
        eagle3 = cfg.eagle3
        check_eagle3(eagle3)
        stages = cfg.curriculum.stages
        if eagle3.offline and any(s.kind != self.name for s in stages):
            raise ValueError(
                f"eagle3.offline={eagle3.offline}: an offline run reads stored hidden states, not images, so every "
                f"stage must be a draft stage; got {[(s.name, s.kind) for s in stages]}"
            )
        self.offline: OfflineTarget | None = None
        self.offline_setup: DataSetup | None = None
        backend = cfg.model.attn_backend
        if eagle3.offline:  # the stored hidden states are the data
            self.offline, self.offline_setup = open_offline(eagle3, cfg.data)
            cfg.model = dataclasses.replace(self.offline.model, attn_backend=backend)
        elif eagle3.target:
            cfg.model = dataclasses.replace(target_model_config(eagle3.target), attn_backend=backend)

    def data_setup(self) -> DataSetup | None:
        return self.offline_setup

    def base_model(self, load: bool) -> VLM | None:
        """Offline: the target's shape with only its LM head and embedding (nothing else runs); with
        `eagle3.target`: the target. The run's config (saved with every checkpoint) then describes it."""
        cfg = self.ctx.cfg
        image_pad = self.ctx.data.encoder.special.image_pad
        if self.offline is not None:
            model = offline_model(self.offline, image_pad, cfg.model.attn_backend)
        elif cfg.eagle3.target:
            model = load_target(cfg.eagle3.target, self.ctx.data.tokenizer, image_pad)
            model.set_attn_backend(cfg.model.attn_backend)
        else:
            return None
        cfg.model = dataclasses.replace(model.cfg)
        return model

    def attach(self, model: VLM) -> None:
        torch.manual_seed(self.ctx.cfg.run.seed)  # the draft starts the same whichever way its target was loaded
        add_draft(model, self.ctx.cfg.eagle3)

    def check_stage(self, stage: StageConfig, where: str, model: VLM) -> None:
        if draft_of(model) is None:
            raise ValueError(f"{where}: a draft stage needs the Eagle3 draft attached (DraftKind.attach)")
        outside = trained_outside(model, list(stage.trainable), [DRAFT_ATTR + ".*"])
        if outside:
            raise ValueError(
                f"{where}: a draft stage trains the draft against a frozen target, but trainable "
                f"{list(stage.trainable)} also matches {outside}: set trainable to [{DRAFT_ATTR}.*]"
            )

    def check_engine(self, engine: EngineChoice) -> None:
        if engine.shards_parameters:
            raise ValueError(
                f"draft stages need whole weights on every rank (the frozen target runs outside the engine), but "
                f"{engine.describe()} shards them: use DeepSpeed ZeRO 0-2 (engine.zero_stage=0, 1 or 2)"
            )

    def trainable(self, stage: StageConfig) -> tuple[list[str], list[str]]:
        return [DRAFT_ATTR + ".*"], [DRAFT_FROZEN]

    def enter(self, stage: StageConfig, model: VLM, fresh: bool) -> None:
        """A draft stage's first step: copy the target's embedding into the draft (frozen) and choose the draft
        vocabulary from the supervised tokens of this stage's data (the same on every rank)."""
        if not fresh:
            return
        draft = draft_of(model)
        assert draft is not None
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(model.llm.embed_tokens.weight)
        cfg = self.ctx.cfg
        stream = build_stream(self.ctx.data, stage_data(cfg.data, stage), cfg.run.seed)
        samples, labels = 0, []
        for pack in stream:
            labels.append(pack.labels)
            samples += pack.num_samples
            if samples >= cfg.eagle3.vocab_samples:
                break
        draft.set_vocabulary(choose_vocabulary(labels, draft.draft_vocab_size, draft.t2d.numel()))
        log.info(
            "draft vocabulary: the %d most frequent of %d target tokens, from %d samples' supervised tokens",
            draft.draft_vocab_size,
            draft.t2d.numel(),
            samples,
        )

    def forward_backward(self, engine: Engine, packs: list[PackedBatch], faults: StepFaults) -> StepResult:
        return draft_forward_backward(engine, packs, self.ctx.cfg.eagle3, faults)
