"""The training run: data -> model -> engine -> curriculum of stages, with checkpoints, evaluation and metrics.

The trainer composes components that each own their config and state: the data loader of this rank (RankData),
the engine (model and optimizer), the curriculum position, the guard, the RNG; they register with the
Checkpointer, which saves and restores them. `run(cfg)` is the whole job: train, save, evaluate, summarise.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlm_train import runtime
from vlm_train.data.redeal import redeal_all_loader_states
from vlm_train.data.video_thinning import THINNED
from vlm_train.devices import pick_device
from vlm_train.jsonio import dumps
from vlm_train.model.vlm import VLM
from vlm_train.train import distributed as D
from vlm_train.train.builders import build_data, build_model, load_initial_weights
from vlm_train.train.checkpoint import (
    MODEL_FILE,
    Checkpointer,
    Launch,
    RandomState,
    consolidate,
    rank_states_or_fresh,
)
from vlm_train.train.config import Config, StageConfig
from vlm_train.train.curriculum import group_lrs, param_groups, validate_curriculum
from vlm_train.train.engines import build_engine, resolve_engine
from vlm_train.train.guards import FaultInjector, Guard, StopSignal
from vlm_train.train.kinds import RunContext, StageKinds
from vlm_train.train.metrics import MetricsLogger, format_duration, pack_fills, step_record
from vlm_train.train.schedule import Position, estimate_total_steps
from vlm_train.train.stage_data import RankData
from vlm_train.train.step import StepResult, finish_step, pack_stats
from vlm_train.train.throughput import device_peak_flops, memory_gb, mfu

log = logging.getLogger("vlm_train")


class Trainer:
    """Owns the run's components; `train()` runs the curriculum from wherever the run stands."""

    def __init__(self, cfg: Config, run_dir: Path, dist: D.DistInfo):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        runtime.set_cpu_threads(cfg.engine.threads)
        self.device = pick_device(cfg.engine.device, dist.local_rank)
        torch.manual_seed(cfg.run.seed)
        # The kinds of the curriculum's stages: each checks and may adjust the run's config, then may provide the
        # data and the model (a draft's target) and attach what it trains beside the VLM.
        ctx = RunContext(cfg, dist, self.device, run_dir)
        self.kinds = StageKinds(ctx)
        for kind in self.kinds:
            kind.configure()
        whole_weights = any(kind.needs_whole_weights for kind in self.kinds)
        engine = resolve_engine(cfg.engine, dist.world_size, whole_weights)
        for kind in self.kinds:
            kind.check_engine(engine)
        launch = Launch(dist.world_size, engine.name, engine.zero_stage)
        self.checkpointer = Checkpointer(run_dir, cfg.checkpoint, dist, launch)
        resume = self.checkpointer.resume_point(cfg.train.resume)
        self.setup = ctx.setup = _first(kind.data_setup() for kind in self.kinds) or build_data(cfg.data, cfg.model)
        if engine.builds_on_meta:  # no rank builds the whole model: the engine materialises its shards
            with torch.device("meta"):
                model = self._build_model(load=False, attach=False)
            self._attach(model)  # small modules, built whole: the engine shards them as they are
        else:
            model = self._build_model(load=resume is None)
        # The resolved config (with a draft's target, the target's model section): saved with every checkpoint.
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if dist.is_main:
            (run_dir / "config.yaml").write_text(self.config_yaml)
        validate_curriculum(cfg.curriculum, model, cfg.loss, cfg.data)
        self.kinds.check_stages(model)
        for kind in self.kinds:
            kind.ready()
        started = time.perf_counter()
        if resume is not None and not engine.builds_on_meta:
            self.checkpointer.load_model(model, resume.folder)
        self.engine = build_engine(
            cfg.engine, cfg.train, model, lambda: self._build_model(load=False), self.device, dist, whole_weights
        )
        if engine.builds_on_meta:
            self.engine.materialize(cfg.run.seed, resume.folder if resume is not None else None)
            if resume is None:
                load_initial_weights(self.engine.model, cfg.model)  # tensor by tensor, into the shards
        if resume is not None:
            log.info("loaded the weights of %s in %.2fs", resume.folder, time.perf_counter() - started)
        self.faults = FaultInjector(cfg.train.fault, dist.rank)
        self.data = RankData(self.setup, cfg.data, cfg.model, cfg.run.seed, dist.rank, dist.world_size, self.faults)
        self.guard = Guard(cfg.train.guard)
        self.position = Position()
        self.rng = RandomState()

        self.checkpointer.register("position", self.position)
        self.checkpointer.register("guard", self.guard)
        if not engine.reshards_checkpoints:
            self.checkpointer.register("optimizer", self.engine, per_rank=True, tensors=True)
        self.checkpointer.register("rng", self.rng, per_rank=True, tensors=True, redeal=rank_states_or_fresh)
        workers = max(cfg.data.num_workers, 1)  # 0 (the loader in the training process) counts as one slot
        self.checkpointer.register(
            "loader",
            self.data,
            per_rank=True,
            redeal=lambda states, size: redeal_all_loader_states(states, size, workers),
        )
        self.saved_step, self.saved = -1, run_dir
        if resume is not None and resume.state is not None:
            started = time.perf_counter()
            self.checkpointer.load(resume)
            if engine.reshards_checkpoints:
                self.engine.load_optimizer_shards(resume.folder)
            _check_curriculum(resume.state, cfg.curriculum.stages, self.position)
            log.info("loaded the training state of %s in %.2fs", resume.folder, time.perf_counter() - started)
            self.saved_step, self.saved = self.position.step, resume.folder
        elif resume is not None:
            log.info("initialising the weights from %s (it holds no training state)", resume.folder)

        self.stop = StopSignal().install()
        self.peak = device_peak_flops(self.device, cfg.logger.peak_tflops)
        total = estimate_total_steps(cfg.curriculum.stages, self.position, 1.0)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        self.metrics = ctx.metrics = MetricsLogger(run_dir, cfg.logger, total, config, dist.is_main, self.position.step)
        log.info(
            "run folder %s | model %.2fM parameters | engine %s%s | %d rank(s) | device %s%s",
            run_dir,
            model.num_parameters() / 1e6,
            engine.describe(),
            " (engine=auto)" if cfg.engine.name == "auto" else "",
            dist.world_size,
            self.device,
            f" | resuming from {resume.folder}" if resume is not None else "",
        )

    def _build_model(self, load: bool, attach: bool = True) -> VLM:
        """The run's VLM (or the one a kind provides: a draft stage's target), with what the kinds train beside it
        attached unless not `attach`; `load=False` skips initial weights that a checkpoint replaces."""
        model = _first(kind.base_model(load) for kind in self.kinds)
        if model is None:
            model = build_model(self.cfg.model, self.setup, load_hf=load)
        if attach:
            self._attach(model)
        return model

    def _attach(self, model: VLM) -> None:
        for kind in self.kinds:
            kind.attach(model)

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
        """A new optimizer over what the stage's kind trains (a restored one if it is this stage's), its data and
        its loss."""
        cfg, kind, model = self.cfg, self.kinds[stage], self.engine.model
        kind.enter(stage, model, fresh=self.position.step_in_stage == 0)

        def make_groups(module: torch.nn.Module) -> list[dict]:
            kind.set_trainable(module, stage)
            return param_groups(module, stage, cfg.curriculum.groups, cfg.train)

        self.engine.start_stage(make_groups, self.position.stage)
        self.data.enter(stage, kind.pack_cost(self.setup.flops_cost))
        length = f"{stage.steps} steps" if stage.steps else f"{stage.tokens} tokens"
        log.info(
            "stage %d '%s' (%s): %s, %.2fM trainable parameters (%s)",
            self.position.stage + 1,
            stage.name,
            stage.kind,
            length,
            self.engine.trainable_parameters() / 1e6,
            ", ".join(kind.trainable(stage)[0]),
        )

    def _step(self, stage: StageConfig) -> StepResult:
        started = time.perf_counter()
        kind = self.kinds[stage]
        lrs = group_lrs(stage, self.position.step_in_stage, self.position.tokens_in_stage, self.engine.param_groups())
        self.engine.set_lrs(lrs)
        packs = self.data.next_packs(self.cfg.train.micro_batches)
        step = self.position.step + 1
        with self.faults.step_faults(step, self.engine.model) as faults:
            result = kind.forward_backward(self.engine, packs, faults)
        pack_stats(result, packs, *self.data.budgets, flops=kind.flops)
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
        if kind.eval_due(self.position.step, self.position.stage_done(stage)):
            with self.engine.inference():
                record.update(kind.evaluate(self.engine.model, self.position.step))
        self.metrics.log(record, histograms=pack_fills(packs, *self.data.budgets))
        return result

    def _counters_due(self, stage: StageConfig) -> bool:
        """The data's skip counters are logged on the console's steps and at the end of every stage."""
        step = self.position.step
        return step == 1 or step % max(self.cfg.logger.console_interval, 1) == 0 or self.position.stage_done(stage)

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
        self.saved = self.checkpointer.save(
            self.position.step,
            config_yaml=self.config_yaml,
            tokenizer=self.setup.tokenizer,
            info=info,
            write_weights=self.engine.save_weights,  # collective under ZeRO-3 and FSDP2
        )
        self.saved_step = self.position.step
        return self.saved

    def finish(self, train_seconds: float, final: Path) -> dict[str, Any]:
        """The kinds' final figures (the held-out evaluation of a trained VLM: on every rank), then summary.json
        (rank 0)."""
        summary: dict[str, Any] = {
            "steps": self.position.step,
            "final_loss": self.metrics.last.get("loss"),
            "skipped_steps": self.guard.total_skipped,
            "train_seconds": train_seconds,
            "checkpoint": str(final),
            **self._data_skips(),
        }
        with self.engine.inference():
            for kind in self.kinds:
                summary.update(kind.final(self.engine.model, self.position.step))
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(dumps(summary, indent=2))
            self.metrics.summary(summary)
        return summary

    def close(self) -> None:
        self.stop.uninstall()
        self.engine.close()
        self.data.close()
        self.metrics.close()


def _first(values: Any) -> Any:
    """The first value that is not None (None if none is)."""
    return next((v for v in values if v is not None), None)


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
        if dist.is_main and not (final / MODEL_FILE).is_file():
            consolidate(final)  # a sharded checkpoint: the whole weights for inference, export and merging
        D.barrier()
        log.info("trained %d steps in %s; checkpoint %s", trainer.position.step, format_duration(train_seconds), final)
        return trainer.finish(train_seconds, final)
    finally:
        trainer.close()  # the process group stays: main() leaves it once, after the last job of a sweep
