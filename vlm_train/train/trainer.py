"""The training run: data -> model -> curriculum of stages -> checkpoint -> held-out evaluation -> summary."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf

from vlm_train.data.batch import PackedBatch
from vlm_train.data.loader import build_loader
from vlm_train.model.vlm import VLM
from vlm_train.train import loss as L
from vlm_train.train.builders import DataSetup, build_data, build_model, build_stream, pick_device
from vlm_train.train.checkpoint import save_checkpoint
from vlm_train.train.config import Config, StageConfig
from vlm_train.train.curriculum import build_optimizer, set_lr, set_trainable, validate_curriculum
from vlm_train.train.evaluate import predict, score, select_heldout
from vlm_train.train.metrics import MetricsLogger, format_duration

log = logging.getLogger("vlm_train")


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    tokens: int
    samples: int
    by_source: dict[str, tuple[float, int]] = field(default_factory=dict)
    by_task: dict[str, tuple[float, int]] = field(default_factory=dict)


def _merge_sums(into: dict[str, tuple[float, int]], new: dict[str, tuple[float, int]]) -> None:
    for key, (total, count) in new.items():
        old_total, old_count = into.get(key, (0.0, 0))
        into[key] = (old_total + total, old_count + count)


def train_step(
    model: VLM, optimizer: torch.optim.Optimizer, packs: list[PackedBatch], cfg: Config, device: torch.device
) -> StepResult:
    """One optimizer step over `packs` (its micro-batches), the loss normalised over all of them."""
    totals = sum((L.pack_totals(p) for p in packs), L.StepTotals(0, 0))
    step_loss = 0.0
    result = StepResult(0.0, 0.0, False, sum(p.num_tokens for p in packs), sum(p.num_samples for p in packs))
    for pack in packs:
        pack = pack.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(pack, return_logits=False).hidden
            # Logits chunk by chunk from the hidden states: never [T, vocab] in fp32 at once.
            token_losses = L.token_cross_entropy(hidden, pack.labels, head=model.llm.lm_head)
        micro_loss = L.weighted_loss(token_losses, L.token_coefficients(pack, totals, cfg.loss.per_sample_weight))
        micro_loss.backward()
        step_loss += float(micro_loss.detach())
        _merge_sums(result.by_source, L.loss_sums_by(pack, token_losses, "source"))
        _merge_sums(result.by_task, L.loss_sums_by(pack, token_losses, "task"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
    result.loss, result.grad_norm = step_loss, float(grad_norm)
    # A non-finite loss or gradient would poison the weights: skip the update, count it.
    result.skipped = not (math.isfinite(step_loss) and math.isfinite(result.grad_norm))
    if not result.skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def _step_metrics(step: int, stage: StageConfig, lr: float, result: StepResult, seconds: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "step": step,
        "stage": stage.name,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": lr,
        "tokens_per_s": result.tokens / seconds,
        "samples_per_s": result.samples / seconds,
        "step_time_s": seconds,
        "skipped_step": int(result.skipped),
    }
    for prefix, sums in (("loss/source", result.by_source), ("loss/task", result.by_task)):
        for key, (total, count) in sums.items():
            if count:
                metrics[f"{prefix}/{key}"] = total / count
    return metrics


def _next_packs(batches: Iterator[PackedBatch], count: int, skipped: Counter) -> list[PackedBatch]:
    packs = [next(batches) for _ in range(count)]
    for pack in packs:
        skipped.update(pack.skipped)
    return packs


def run(cfg: Config) -> dict[str, Any]:
    """Train through every stage of the curriculum, save, evaluate, and write summary.json."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.engine.name == "single" and world_size > 1:
        raise RuntimeError(f"engine=single trains in one process, but WORLD_SIZE={world_size}: launch one process")
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    structured = OmegaConf.structured(cfg)
    config_yaml = OmegaConf.to_yaml(structured)
    (run_dir / "config.yaml").write_text(config_yaml)
    if cfg.engine.threads > 0:
        torch.set_num_threads(cfg.engine.threads)
    device = pick_device(cfg.engine.device)
    torch.manual_seed(cfg.run.seed)

    setup = build_data(cfg.data, cfg.model)
    model = build_model(cfg.model, setup).to(device)
    validate_curriculum(cfg.curriculum, model)
    total_steps = sum(stage.steps for stage in cfg.curriculum.stages)
    log.info("run folder %s | model %.2fM parameters | device %s", run_dir, model.num_parameters() / 1e6, device)

    metrics = MetricsLogger(run_dir, cfg.logger, total_steps, OmegaConf.to_container(structured))
    batches = iter(build_loader(build_stream(setup, cfg.data, seed=cfg.run.seed), cfg.data.num_workers))
    skipped_data: Counter = Counter()
    skipped_steps = 0
    step, last_loss = 0, float("nan")
    started = time.perf_counter()
    model.train()
    for stage_index, stage in enumerate(cfg.curriculum.stages):
        trainable = set_trainable(model, stage.trainable)
        optimizer = build_optimizer(trainable, stage, cfg.train)
        log.info("stage %d '%s': %d steps, %.2fM trainable parameters (%s)", stage_index + 1, stage.name,
                 stage.steps, sum(p.numel() for p in trainable) / 1e6, ", ".join(stage.trainable))  # fmt: skip
        for step_in_stage in range(stage.steps):
            step_started = time.perf_counter()
            lr = set_lr(optimizer, stage, step_in_stage)
            packs = _next_packs(batches, cfg.train.micro_batches, skipped_data)
            result = train_step(model, optimizer, packs, cfg, device)
            step += 1
            skipped_steps += int(result.skipped)
            last_loss = result.loss
            record = _step_metrics(step, stage, lr, result, time.perf_counter() - step_started)
            record["skipped_steps"] = skipped_steps
            record.update({f"data/skipped/{reason}": count for reason, count in skipped_data.items()})
            metrics.log(record)
            if cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0 and step < total_steps:
                save_checkpoint(run_dir, step, model, optimizer, {"step": step, "stage": stage_index}, config_yaml,
                                setup.tokenizer, cfg.checkpoint.keep_last)  # fmt: skip
    train_seconds = time.perf_counter() - started
    final = save_checkpoint(run_dir, step, model, optimizer, {"step": step, "stage": len(cfg.curriculum.stages) - 1},
                            config_yaml, setup.tokenizer, cfg.checkpoint.keep_last)  # fmt: skip
    log.info("trained %d steps in %s; checkpoint %s", step, format_duration(train_seconds), final)

    summary: dict[str, Any] = {
        "steps": step,
        "final_loss": last_loss,
        "skipped_steps": skipped_steps,
        "train_seconds": train_seconds,
        "checkpoint": str(final),
        **{f"data/skipped/{reason}": count for reason, count in skipped_data.items()},
    }
    if cfg.eval.enabled and setup.heldout_urls:
        summary.update(evaluate_and_report(model, setup, cfg, device, run_dir))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics.summary(summary)
    metrics.close()
    return summary


def evaluate_and_report(model: VLM, setup: DataSetup, cfg: Config, device: torch.device, run_dir: Path) -> dict[str, Any]:
    """Score the held-out split, print a few examples, and keep every prediction in heldout_predictions.jsonl."""
    started = time.perf_counter()
    samples = select_heldout(setup.heldout_urls, cfg.eval, cfg.data.image.max_decode_pixels)
    predictions = predict(model, setup.encoder, samples, cfg.eval, device)
    scores = score(predictions)
    with open(run_dir / "heldout_predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p.__dict__) + "\n")
    shown: list = []
    for task in ("caption", "grounding"):
        shown += [p for p in predictions if p.task == task][: max(cfg.eval.show_examples // 2, 1)]
    print("\nHeld-out examples:")
    for p in shown:
        mark = "ok " if p.correct else "MISS"
        print(f"  [{mark}] {p.task:9s} image {p.image:12s} | prompt: {p.prompt.replace('<image>', '')!r}")
        print(f"         expected: {p.expected!r}\n         generated: {p.generated!r}")
    print(
        f"Held-out score: caption exact match {scores['heldout_exact_match']:.3f} "
        f"({scores['heldout_exact_match_n']} samples), grounding IoU>=0.5 accuracy "
        f"{scores['heldout_grounding_acc']:.3f} ({scores['heldout_grounding_acc_n']} samples), "
        f"in {time.perf_counter() - started:.1f}s\n"
    )
    return scores
