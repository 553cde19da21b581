"""The training run: data -> model -> engine -> curriculum of stages, with checkpoints, evaluation and metrics.

The trainer composes components that each own their config and state: the data loader of this rank (RankData),
the engine (model and optimizer), the curriculum position, the guard, the RNG; they register with the
Checkpointer, which saves and restores them. `run(cfg)` is the whole job: train, save, evaluate, summarise.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlm_train import runtime
from vlm_train.data.video_thinning import THINNED
from vlm_train.devices import pick_device
from vlm_train.jsonio import dumps
from vlm_train.model.draft import draft_of
from vlm_train.model.flops import TrainedParts
from vlm_train.model.vlm import VLM
from vlm_train.train import distributed as D
from vlm_train.train.builders import add_draft, build_data, build_model, build_stream
from vlm_train.train.checkpoint import Checkpointer, Launch, RandomState
from vlm_train.train.config import Config, StageConfig
from vlm_train.train.curriculum import (
    check_vision_stages,
    group_lrs,
    param_groups,
    set_stage_trainable,
    stage_data,
    stage_loss,
    validate_curriculum,
)
from vlm_train.train.draft_objective import check_eagle3, choose_vocabulary
from vlm_train.train.draft_offline import OfflineTarget, offline_model, open_offline
from vlm_train.train.draft_step import draft_forward_backward
from vlm_train.train.draft_target import load_target
from vlm_train.train.engines import build_engine, resolve_engine
from vlm_train.train.evaluator import PREDICTIONS_FILE, HeldoutEvaluator, HeldoutResult, print_report, write_predictions
from vlm_train.train.guards import FaultInjector, Guard, StopSignal
from vlm_train.train.metrics import MetricsLogger, format_duration, step_record
from vlm_train.train.schedule import Position, estimate_total_steps
from vlm_train.train.stage_data import RankData
from vlm_train.train.step import LossGroups, StepResult, finish_step, forward_backward, pack_stats
from vlm_train.train.throughput import device_peak_flops, memory_gb, mfu
from vlm_train.train.vision_eval import VisionEvaluator
from vlm_train.train.vision_objective import LabelVocabulary
from vlm_train.train.vision_step import vision_forward_backward

log = logging.getLogger("vlm_train")


class Trainer:
    """Owns the run's components; `train()` runs the curriculum from wherever the run stands."""

    def __init__(self, cfg: Config, run_dir: Path, dist: D.DistInfo):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        runtime.set_cpu_threads(cfg.engine.threads)
        self.device = pick_device(cfg.engine.device, dist.local_rank)
        torch.manual_seed(cfg.run.seed)
        engine_name, zero_stage = resolve_engine(cfg.engine, dist.world_size)
        launch = Launch(dist.world_size, engine_name, zero_stage)
        self.checkpointer = Checkpointer(run_dir, cfg.checkpoint, dist, launch)
        resume = self.checkpointer.resume_point(cfg.train.resume)

        stages = cfg.curriculum.stages
        self.heads = cfg.vision_pretrain if any(s.kind == "vision" for s in stages) else None
        self.eagle3 = cfg.eagle3 if any(s.kind == "draft" for s in stages) else None
        if self.eagle3 is not None:
            check_eagle3(self.eagle3, stages, zero_stage)
        self.offline: OfflineTarget | None = None
        if self.eagle3 is not None and self.eagle3.offline:  # the stored hidden states are the data
            self.offline, self.setup = open_offline(self.eagle3, cfg.data)
        else:
            self.setup = build_data(cfg.data, cfg.model)
        model = self._build_model(load=resume is None)
        # The resolved config (with a draft's target, the target's model section): saved with every checkpoint.
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if dist.is_main:
            (run_dir / "config.yaml").write_text(self.config_yaml)
        validate_curriculum(cfg.curriculum, model, cfg.loss, cfg.data)
        if self.heads is not None:
            check_vision_stages(stages, cfg.vision_pretrain, model)
        self.vocab = LabelVocabulary(cfg.vision_pretrain.labels)
        if resume is not None:
            self.checkpointer.load_model(model, resume.folder)
        self.engine = build_engine(
            cfg.engine, cfg.train, model, lambda: self._build_model(load=False), self.device, dist
        )
        self.faults = FaultInjector(cfg.train.fault, dist.rank)
        self.data = RankData(self.setup, cfg.data, cfg.model, cfg.run.seed, dist.rank, dist.world_size, self.faults)
        self.guard = Guard(cfg.train.guard)
        self.position = Position()
        self.rng = RandomState()
        self.evaluator = self._make_evaluator()
        self.vision_evaluator = self._make_vision_evaluator() if self.heads is not None else None
        self.last_vision_eval: dict[str, Any] = {}
        self.loss_groups = LossGroups(tuple(s.name for s in self.setup.sources))  # the same on every rank
        self.last_eval: tuple[int, HeldoutResult] | None = None

        self.checkpointer.register("position", self.position)
        self.checkpointer.register("guard", self.guard)
        self.checkpointer.register("optimizer", self.engine, per_rank=True, tensors=True)
        self.checkpointer.register("rng", self.rng, per_rank=True, tensors=True)
        self.checkpointer.register("loader", self.data, per_rank=True)
        self.saved_step, self.saved = -1, run_dir
        if resume is not None and resume.state is not None:
            self.checkpointer.load(resume)
            _check_curriculum(resume.state, cfg.curriculum.stages, self.position)
            self.saved_step, self.saved = self.position.step, resume.folder
        elif resume is not None:
            log.info("initialising the weights from %s (it holds no training state)", resume.folder)

        self.stop = StopSignal().install()
        self.peak = device_peak_flops(self.device, cfg.logger.peak_tflops)
        total = estimate_total_steps(cfg.curriculum.stages, self.position, 1.0)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        self.metrics = MetricsLogger(run_dir, cfg.logger, total, config, dist.is_main, self.position.step)
        log.info(
            "run folder %s | model %.2fM parameters | engine %s%s%s | %d rank(s) | device %s%s",
            run_dir,
            model.num_parameters() / 1e6,
            engine_name,
            f" ZeRO-{zero_stage}" if zero_stage is not None else "",
            " (engine=auto)" if cfg.engine.name == "auto" else "",
            dist.world_size,
            self.device,
            f" | resuming from {resume.folder}" if resume is not None else "",
        )

    def _build_model(self, load: bool) -> VLM:
        """The run's VLM (a draft stage's target: `eagle3.target` when set; offline, the stored target's shape with
        its LM head and embedding, see draft_offline.py), with the vision heads and the draft attached when a stage
        needs them; `load=False` skips initial weights that a checkpoint replaces."""
        cfg, eagle3 = self.cfg, self.eagle3
        if self.offline is not None:  # the target's shape with only its LM head and embedding: nothing else runs
            model = offline_model(self.offline, self.setup.encoder.special.image_pad, cfg.model.attn_backend)
            cfg.model = dataclasses.replace(model.cfg)
        elif eagle3 is not None and eagle3.target:
            image_pad = self.setup.encoder.special.image_pad
            model = load_target(eagle3.target, self.setup.tokenizer, image_pad)
            model.set_attn_backend(cfg.model.attn_backend)
            cfg.model = dataclasses.replace(model.cfg)  # the checkpoints' config describes the target
        else:
            model = build_model(cfg.model, self.setup, load_hf=load, vision_pretrain=self.heads)
        if eagle3 is None:
            return model
        torch.manual_seed(cfg.run.seed)  # the draft starts the same whichever way its target was loaded
        return add_draft(model, eagle3)

    def _start_draft(self, stage: StageConfig) -> None:
        """A draft stage's first step: copy the target's embedding into the draft (frozen) and choose the draft
        vocabulary from the supervised tokens of this stage's data (the same on every rank)."""
        assert self.eagle3 is not None
        draft = draft_of(self.engine.model)
        assert draft is not None
        target = self.engine.model.llm.embed_tokens.weight
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(target)
        stream = build_stream(self.setup, stage_data(self.cfg.data, stage), self.cfg.run.seed)
        samples, labels = 0, []
        for pack in stream:
            labels.append(pack.labels)
            samples += pack.num_samples
            if samples >= self.eagle3.vocab_samples:
                break
        ids = choose_vocabulary(labels, draft.draft_vocab_size, draft.t2d.numel())
        draft.set_vocabulary(ids)
        log.info(
            "draft vocabulary: the %d most frequent of %d target tokens, from %d samples' supervised tokens",
            draft.draft_vocab_size,
            draft.t2d.numel(),
            samples,
        )

    def _make_evaluator(self) -> HeldoutEvaluator | None:
        eval_cfg = self.cfg.eval
        wanted = eval_cfg.enabled or eval_cfg.interval > 0 or eval_cfg.at_stage_end
        if not (wanted and self.setup.heldout_urls):
            return None
        data = self.cfg.data  # held-out videos are sampled as the training videos are (data.video)
        return HeldoutEvaluator.from_setup(self.setup, eval_cfg, data.image.max_decode_pixels, data.video)

    def _make_vision_evaluator(self) -> VisionEvaluator | None:
        if not self.setup.heldout_urls:
            return None
        max_pixels = self.cfg.data.image.max_decode_pixels
        return VisionEvaluator(self.setup.heldout_urls, self.setup.encoder, self.cfg.eval, max_pixels, self.vocab)

    # ---- the curriculum ---------------------------------------------------------------------------------------

    def train(self) -> str:
        """Run the stages from the current position; returns why it stopped: done, exit_at_step or signal."""
        stages = self.cfg.curriculum.stages
        while self.position.stage < len(stages) - 1 and self.position.stage_done(stages[self.position.stage]):
            self.position.next_stage()  # the checkpoint was taken at the end of a stage
        while True:
            stage = stages[self.position.stage]
            self._enter_stage(stage)
            self.rng.apply()  # a restored RNG state, right before the first step it was saved for
            while not self.position.stage_done(stage):
                result = self._step(stage)
                reason = self._after_step(result)
                if reason:
                    return reason
            if self.position.stage == len(stages) - 1:
                return "done"
            self.position.next_stage()

    def _enter_stage(self, stage: StageConfig) -> None:
        """A new optimizer over the stage's trainable groups (a restored one if it is this stage's), its data and
        its loss."""
        cfg = self.cfg

        def make_groups(module: torch.nn.Module) -> list[dict]:
            set_stage_trainable(module, stage)
            return param_groups(module, stage, cfg.curriculum.groups, cfg.train)

        if stage.kind == "draft" and self.position.step_in_stage == 0:
            self._start_draft(stage)
        self.engine.start_stage(make_groups, self.position.stage)
        self.data.enter(stage)
        self.policy = stage_loss(cfg.loss, stage)
        self.trained_parts = TrainedParts.of(self.engine.model)  # what runs backward, for the stage's MFU
        if stage.kind == "vision":  # only the tower runs (and the heads, not counted)
            self.trained_parts = TrainedParts(
                vision=self.trained_parts.vision, projector=False, llm=False, lm_head=False
            )
        elif stage.kind == "draft":  # the VLM is frozen; the draft's FLOPs are not counted in MFU
            self.trained_parts = TrainedParts(vision=False, projector=False, llm=False, lm_head=False)
        # ZeRO-3 leaves a partition in each parameter; ds_numel is its full size.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.model.parameters() if p.requires_grad)
        length = f"{stage.steps} steps" if stage.steps else f"{stage.tokens} tokens"
        log.info(
            "stage %d '%s': %s, %.2fM trainable parameters (%s)",
            self.position.stage + 1,
            stage.name,
            length,
            trainable / 1e6,
            ", ".join(stage.trainable),
        )

    def _step(self, stage: StageConfig) -> StepResult:
        started = time.perf_counter()
        lrs = group_lrs(stage, self.position.step_in_stage, self.position.tokens_in_stage, self.engine.param_groups())
        self.engine.set_lrs(lrs)
        packs = self.data.next_packs(self.cfg.train.micro_batches)
        step = self.position.step + 1
        vision = stage.kind == "vision"
        if stage.kind == "draft":
            assert self.eagle3 is not None
            result = draft_forward_backward(
                self.engine,
                packs,
                self.eagle3,
                nan=self.faults.nan_loss(step),
                inf_grad=lambda model: self.faults.inf_grad(step, model),
            )
        elif vision:
            image_pad = self.setup.encoder.special.image_pad
            dist = self.dist
            result = vision_forward_backward(
                self.engine, packs, self.cfg.vision_pretrain, self.vocab, image_pad, dist.rank, dist.world_size
            )
        else:
            result = forward_backward(
                self.engine,
                packs,
                self.policy,
                nan=self.faults.nan_loss(step),
                inf_grad=lambda model: self.faults.inf_grad(step, model),
                groups=self.loss_groups,
            )
        pack_stats(result, packs, self.engine, *self.data.budgets, trained=self.trained_parts, vision_only=vision)
        result = finish_step(self.engine, result, self.guard, self.stop.received)
        self.position.advance(result.tokens)
        self.guard.record(self.position.step, result.loss, result.skipped)
        tokens_per_step = self.position.tokens / max(self.position.step, 1)
        self.metrics.total_steps = estimate_total_steps(self.cfg.curriculum.stages, self.position, tokens_per_step)
        seconds = time.perf_counter() - started
        record = step_record(
            self.position,
            stage.name,
            lrs,
            result,
            seconds,
            self.guard.skipped,
            mfu(result.flops, seconds, self.peak, self.dist.world_size),
        )
        if self._counters_due(stage):
            record.update(self._data_skips())  # a collective of Python objects: not on every step
        record.update(memory_gb(self.device))
        if vision and self.vision_evaluator is not None and (self._eval_due(stage) or self.position.stage_done(stage)):
            record.update(self.evaluate_vision())
        elif self._eval_due(stage):
            record.update(self.evaluate().metrics)
        self.metrics.log(record)
        return result

    def _counters_due(self, stage: StageConfig) -> bool:
        """The data's skip counters are logged on the console's steps and at the end of every stage."""
        step = self.position.step
        return step == 1 or step % max(self.cfg.logger.console_interval, 1) == 0 or self.position.stage_done(stage)

    def _eval_due(self, stage: StageConfig) -> bool:
        if stage.kind == "draft":  # the VLM is frozen: its held-out figures do not change
            return False
        interval, step = self.cfg.eval.interval, self.position.step
        stage_end = self.cfg.eval.at_stage_end and self.position.stage_done(stage)
        return self.evaluator is not None and ((interval > 0 and step % interval == 0) or stage_end)

    def evaluate(self) -> HeldoutResult:
        """Held-out figures of the model as it is now (on every rank: ZeRO-3 gathers weights collectively)."""
        assert self.evaluator is not None, "no held-out data: set data.heldout_urls"
        step = self.position.step
        if self.last_eval is not None and self.last_eval[0] == step:
            return self.last_eval[1]
        result = self.evaluator.evaluate(self.engine.model, self.device)
        self.last_eval = (step, result)
        m = result.metrics
        log.info(
            "eval at step %d: heldout_loss %s | caption exact match %s | grounding acc %s | %.1fs",
            step,
            _figure(m.get("heldout_loss")),
            _figure(m.get("heldout_exact_match")),
            _figure(m.get("heldout_grounding_acc")),
            result.seconds,
        )
        return result

    def evaluate_vision(self) -> dict[str, Any]:
        """The vision stage's held-out figures (every rank), logged and kept for the summary."""
        assert self.vision_evaluator is not None, "no held-out data: set data.heldout_urls"
        metrics = self.vision_evaluator.evaluate(self.engine.model, self.device)
        log.info(
            "vision eval at step %d: zero-shot retrieval top-1 %s | label exact %s | label acc %s | %.1fs",
            self.position.step,
            _figure(metrics.get("vision/heldout_retrieval_top1")),
            _figure(metrics.get("vision/heldout_label_exact")),
            _figure(metrics.get("vision/heldout_label_acc")),
            metrics["vision/heldout_seconds"],
        )
        self.last_vision_eval = metrics
        return metrics

    def _after_step(self, result: StepResult) -> str | None:
        """Save when asked to; the reason to stop now, if any."""
        step, train = self.position.step, self.cfg.train
        self.faults.after_step(step)
        stages = self.cfg.curriculum.stages
        finished = self.position.stage == len(stages) - 1 and self.position.stage_done(stages[-1])
        reason = "signal" if result.stop else "exit_at_step" if step == train.exit_at_step and not finished else None
        interval = self.cfg.checkpoint.interval
        if reason or (interval > 0 and step % interval == 0):
            self.save()
        if reason:
            why = "SIGTERM" if reason == "signal" else f"train.exit_at_step={train.exit_at_step}"
            log.warning("stopping after step %d (%s); checkpoint saved, the next launch resumes", step, why)
        return reason

    def _data_skips(self) -> dict[str, int]:
        """data/skipped/<source>/<reason>, summed over ranks; videos thinned to fit a pack (kept, not skipped, but
        counted by the same loader counter) as data/video_thinned/<source>."""
        total: dict[str, int] = {}
        for skipped in D.all_gather_object(self.data.skipped()):
            for key, count in skipped.items():
                source, _, reason = key.rpartition("/")
                name = f"data/video_thinned/{source}" if reason == THINNED else f"data/skipped/{key}"
                total[name] = total.get(name, 0) + count
        return total

    def save(self) -> Path:
        stages = self.cfg.curriculum.stages
        info = {"stage_name": stages[self.position.stage].name, "stages": [s.name for s in stages]}
        model = self.engine.export_model()  # collective under ZeRO-3
        self.saved = self.checkpointer.save(self.position.step, model, self.config_yaml, self.setup.tokenizer, info)
        self.saved_step = self.position.step
        return self.saved

    def finish(self, train_seconds: float, final: Path) -> dict[str, Any]:
        """The final held-out evaluation (every rank), then summary.json and its predictions (rank 0)."""
        summary: dict[str, Any] = {
            "steps": self.position.step,
            "final_loss": self.metrics.last.get("loss"),
            "skipped_steps": self.guard.total_skipped,
            "train_seconds": train_seconds,
            "checkpoint": str(final),
            **self._data_skips(),
            **self.last_vision_eval,
        }
        vlm_trained = any(s.kind == "vlm" for s in self.cfg.curriculum.stages)  # else there is no VLM to score
        result = self.evaluate() if self.cfg.eval.enabled and self.evaluator is not None and vlm_trained else None
        if result is not None:
            summary.update(result.metrics)
        if self.dist.is_main:
            if result is not None:
                write_predictions(result.predictions, self.run_dir / PREDICTIONS_FILE)
                print_report(result, self.cfg.eval.show_examples)
            (self.run_dir / "summary.json").write_text(dumps(summary, indent=2))
            self.metrics.summary(summary)
        return summary

    def close(self) -> None:
        self.stop.uninstall()
        self.engine.close()
        self.data.close()
        self.metrics.close()


def _figure(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _check_curriculum(state: dict[str, Any], stages: list[StageConfig], position: Position) -> None:
    """A resumed run must still have the stage it stopped in; other changes to the curriculum are allowed."""
    names = [s.name for s in stages]
    if position.stage >= len(stages):
        raise ValueError(
            f"the checkpoint is in stage {position.stage + 1} ({state.get('stage_name')!r}) but "
            f"curriculum.stages has {len(stages)}: {names}"
        )
    if state.get("stages") != names:
        log.warning(
            "the curriculum changed since the checkpoint (stages %s, now %s): continuing in stage %d (%s)",
            state.get("stages"),
            names,
            position.stage + 1,
            names[position.stage],
        )


def shared_run_dir(run_dir: str) -> Path:
    """Rank 0's run folder on every rank (made once)."""
    path = Path(D.broadcast_object(run_dir))
    if D.env_info().is_main:
        path.mkdir(parents=True, exist_ok=True)
    D.barrier()
    return path


def run(cfg: Config) -> dict[str, Any]:
    """Train through every stage of the curriculum, save, evaluate, and write summary.json."""
    resolve_engine(cfg.engine, D.env_info().world_size)  # engine=single refuses several processes before any collective
    dist = D.init_process_group()
    run_dir = shared_run_dir(cfg.run.dir)
    runtime.log_on_main_only(dist.is_main)
    trainer = Trainer(cfg, run_dir, dist)
    try:
        started = time.perf_counter()
        reason = trainer.train()
        train_seconds = time.perf_counter() - started
        if reason != "done":
            return {"steps": trainer.position.step, "stopped": reason}
        final = trainer.save() if trainer.saved_step != trainer.position.step else trainer.saved
        log.info("trained %d steps in %s; checkpoint %s", trainer.position.step, format_duration(train_seconds), final)
        return trainer.finish(train_seconds, final)
    finally:
        trainer.close()
        D.shutdown(clean=sys.exc_info()[0] is None)
