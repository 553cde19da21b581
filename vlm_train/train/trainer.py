"""The training run: data -> model -> curriculum of stages -> checkpoint -> held-out evaluation -> summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlm_train.train import distributed as D
from vlm_train.train.builders import build_data, build_model, pick_device
from vlm_train.train.checkpoint import load_model_weights, load_rng
from vlm_train.train.config import Config, StageConfig
from vlm_train.train.curriculum import group_lrs, param_groups, set_trainable, stage_loss, validate_curriculum
from vlm_train.train.engine import build_engine
from vlm_train.train.evaluate import evaluate_and_report
from vlm_train.train.guards import FaultInjector, Guard, StopSignal
from vlm_train.train.metrics import MetricsLogger, format_duration, step_record, truncate_metrics
from vlm_train.train.resume import Resume, loader_state, open_resume, save_training_state
from vlm_train.train.schedule import Position, estimate_total_steps
from vlm_train.train.stage_data import RankData
from vlm_train.train.step import StepResult, finish_step, forward_backward, pack_stats
from vlm_train.train.throughput import device_peak_flops, memory_gb, mfu

log = logging.getLogger("vlm_train")


class Trainer:
    """Owns the run's components; `train()` runs the curriculum from wherever the run stands."""

    def __init__(self, cfg: Config, run_dir: Path, dist: D.DistInfo):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if dist.is_main:
            (run_dir / "config.yaml").write_text(self.config_yaml)
        if cfg.engine.threads > 0:
            torch.set_num_threads(cfg.engine.threads)
        self.device = pick_device(cfg.engine.device, dist.local_rank)
        torch.manual_seed(cfg.run.seed)
        self.setup = build_data(cfg.data, cfg.model)
        self.resume = open_resume(run_dir, cfg.train.resume, dist.world_size, cfg.engine.name, cfg.engine.zero_stage)
        model = build_model(cfg.model, self.setup, load_hf=self.resume is None)
        validate_curriculum(cfg.curriculum, model, cfg.loss)
        if self.resume is not None:
            load_model_weights(model, self.resume.folder)
        self.engine = build_engine(
            cfg.engine, cfg.train, model, lambda: build_model(cfg.model, self.setup, False), self.device, dist
        )
        self.faults = FaultInjector(cfg.train.fault, dist.rank)
        self.data = RankData(self.setup, cfg.data, cfg.model, cfg.run.seed, dist.rank, dist.world_size, self.faults)
        self.guard = Guard(cfg.train.guard)
        self.position = Position()
        self.saved_step, self.saved = -1, run_dir
        if self.resume is not None and self.resume.state is not None:
            self.position = Position.from_state(self.resume.state["position"])
            _check_curriculum(self.resume.state, cfg.curriculum.stages, self.position)
            self.guard.load_state_dict(self.resume.state["guard"])
            self.saved_step, self.saved = self.position.step, self.resume.folder
            if dist.is_main:
                truncate_metrics(run_dir, self.position.step)
        self.stop = StopSignal().install()
        self.peak = device_peak_flops(self.device, cfg.logger.peak_tflops)
        stages = cfg.curriculum.stages
        self.metrics = MetricsLogger(
            run_dir,
            cfg.logger,
            estimate_total_steps(stages, self.position, 1.0),
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            dist.is_main,
            self.position.step,
        )
        log.info(
            "run folder %s | model %.2fM parameters | engine %s%s | %d rank(s) | device %s%s",
            run_dir,
            model.num_parameters() / 1e6,
            cfg.engine.name,
            f" ZeRO-{cfg.engine.zero_stage}" if cfg.engine.name == "deepspeed" else "",
            dist.world_size,
            self.device,
            f" | resuming from {self.resume.folder}" if self.resume else "",
        )

    # ---- the curriculum ---------------------------------------------------------------------------------------

    def train(self) -> str:
        """Run the stages from the current position; returns why it stopped: done, exit_at_step or signal."""
        stages = self.cfg.curriculum.stages
        resume = self.resume if self.resume is not None and self.resume.state is not None else None
        saved_stage = self.position.stage
        while self.position.stage < len(stages) - 1 and self.position.stage_done(stages[self.position.stage]):
            self.position.next_stage()  # the checkpoint was taken at the end of a stage
        while True:
            stage = stages[self.position.stage]
            self._enter_stage(stage, resume, same_stage=resume is not None and saved_stage == self.position.stage)
            if resume is not None:
                load_rng(resume.folder, self.dist.rank)  # last, right before the first step it was saved for
                resume = None
            while not self.position.stage_done(stage):
                result = self._step(stage)
                reason = self._after_step(result)
                if reason:
                    return reason
            if self.position.stage == len(stages) - 1:
                return "done"
            self.position.next_stage()

    def _enter_stage(self, stage: StageConfig, resume: Resume | None, same_stage: bool) -> None:
        """A new optimizer over the stage's trainable groups, the stage's data and loss; from `resume` if given."""
        cfg = self.cfg

        def make_groups(module: torch.nn.Module) -> list[dict]:
            set_trainable(module, stage.trainable)
            return param_groups(module, stage, cfg.curriculum.groups, cfg.train)

        self.engine.start_stage(make_groups)
        if resume is not None and same_stage:
            self.engine.load_optimizer(resume.folder)
        self.data.enter(stage, loader_state(resume.folder, self.dist.rank) if resume is not None else None)
        self.policy = stage_loss(cfg.loss, stage)
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
        result = forward_backward(
            self.engine,
            packs,
            self.policy,
            nan=self.faults.nan_loss(step),
            inf_grad=lambda model: self.faults.inf_grad(step, model),
        )
        pack_stats(result, packs, self.engine, *self.data.budgets)
        result = finish_step(self.engine, result, self.guard, self.stop.received)
        self.position.advance(result.tokens)
        self.guard.record(self.position.step, result.loss, result.skipped)
        self.metrics.total_steps = estimate_total_steps(
            self.cfg.curriculum.stages, self.position, self.position.tokens / max(self.position.step, 1)
        )
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
        record.update(self._data_skips())
        record.update(memory_gb(self.device))
        self.metrics.log(record)
        return result

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
            log.warning(
                "stopping after step %d (%s); checkpoint saved, the next launch resumes",
                step,
                "SIGTERM" if reason == "signal" else f"train.exit_at_step={train.exit_at_step}",
            )
        return reason

    def _data_skips(self) -> dict[str, int]:
        """data/skipped/<source>/<reason>, summed over ranks."""
        total: dict[str, int] = {}
        for skipped in D.all_gather_object(self.data.skipped()):
            for key, count in skipped.items():
                total[f"data/skipped/{key}"] = total.get(f"data/skipped/{key}", 0) + count
        return total

    def save(self) -> Path:
        stages = self.cfg.curriculum.stages
        state = {
            "step": self.position.step,
            "position": self.position.state_dict(),
            "guard": self.guard.state_dict(),
            "world_size": self.dist.world_size,
            "engine": self.cfg.engine.name,
            "zero_stage": self.cfg.engine.zero_stage,
            "stage_name": stages[self.position.stage].name,
            "stages": [s.name for s in stages],
        }
        self.saved = save_training_state(
            self.run_dir,
            self.position.step,
            self.engine,
            self.data.state_dict(),
            state,
            self.config_yaml,
            self.setup.tokenizer,
            self.cfg.checkpoint.keep_last,
        )
        self.saved_step = self.position.step
        return self.saved

    def close(self) -> None:
        self.stop.uninstall()
        self.engine.close()
        self.data.close()
        self.metrics.close()


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
    world_size = D.env_info().world_size
    if cfg.engine.name == "single" and world_size > 1:
        raise RuntimeError(
            f"engine=single trains in one process, but WORLD_SIZE={world_size}: launch one "
            "process, or use engine=deepspeed under torchrun"
        )
    dist = D.init_process_group()
    run_dir = shared_run_dir(cfg.run.dir)
    if not dist.is_main:
        log.setLevel(logging.WARNING)  # one progress log, from rank 0
    trainer = Trainer(cfg, run_dir, dist)
    try:
        started = time.perf_counter()
        reason = trainer.train()
        train_seconds = time.perf_counter() - started
        if reason != "done":
            return {"steps": trainer.position.step, "stopped": reason}
        final = trainer.save() if trainer.saved_step != trainer.position.step else trainer.saved
        log.info("trained %d steps in %s; checkpoint %s", trainer.position.step, format_duration(train_seconds), final)
        model = trainer.engine.export_model()  # collective under ZeRO-3
        trainer.engine.close()
        summary = _summary(trainer, train_seconds, final)
        if dist.is_main:
            if cfg.eval.enabled and trainer.setup.heldout_urls:
                assert model is not None
                summary.update(evaluate_and_report(model, trainer.setup, cfg, trainer.device, run_dir))
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            trainer.metrics.summary(summary)
        return summary
    finally:
        trainer.close()
        D.shutdown(clean=sys.exc_info()[0] is None)


def _summary(trainer: Trainer, train_seconds: float, final: Path) -> dict[str, Any]:
    return {
        "steps": trainer.position.step,
        "final_loss": trainer.metrics.last.get("loss", float("nan")),
        "skipped_steps": trainer.guard.total_skipped,
        "train_seconds": train_seconds,
        "checkpoint": str(final),
        **trainer._data_skips(),
    }
