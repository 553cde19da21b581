"""One optimizer step: the step's normalisers all-reduced first, then forward and backward per micro-batch, then
the guarded update. Every rank computes the same global loss, so every rank takes the same decision."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_train.data.batch import PackedBatch
from vlm_train.model.flops import TrainedParts, pack_flops
from vlm_train.train import distributed as D
from vlm_train.train import loss as L
from vlm_train.train.config import LossConfig
from vlm_train.train.engines import Engine
from vlm_train.train.guards import NONFINITE_GRAD, Guard

Sums = dict[str, tuple[float, int]]


@dataclass
class StepResult:
    """What one optimizer step did, summed over all ranks."""

    loss: float
    grad_norm: float = float("nan")
    skipped: str | None = None  # the reason the update was skipped
    tokens: int = 0  # LLM tokens of the step's packs
    samples: int = 0
    supervised: int = 0  # tokens with a label
    patches: int = 0
    flops: float = 0.0  # model training FLOPs (forward + backward)
    packs: int = 0
    llm_fill: float = 0.0  # sum over packs of tokens / llm_budget
    vit_fill: float = 0.0  # sum over packs of patches / vit_budget
    stop: bool = False  # some rank received SIGTERM
    by_source: Sums = field(default_factory=dict)
    by_task: Sums = field(default_factory=dict)


def _merge(into: Sums, new: Sums) -> None:
    for key, (total, count) in new.items():
        old_total, old_count = into.get(key, (0.0, 0))
        into[key] = (old_total + total, old_count + count)


def forward_backward(
    engine: Engine,
    packs: list[PackedBatch],
    policy: LossConfig,
    nan: bool = False,
    inf_grad: Callable[[nn.Module], Callable[[], None]] | None = None,
) -> StepResult:
    """Forward and backward over this rank's micro-batches, each weighted by the step's global normalisers."""
    local = sum((L.pack_totals(p, policy) for p in packs), L.StepTotals(0, 0))
    totals = L.StepTotals.from_tensor(D.all_reduce(local.to_tensor()))
    # ZeRO-3 gathers the head's weight at each call and the calls must match across ranks: one call per pack.
    chunk = 0 if engine.zero_stage == 3 else L.DEFAULT_CHUNK_SIZE
    module, head = engine.forward_module(), engine.model.llm.lm_head
    result = StepResult(loss=0.0)
    step_loss = torch.zeros((), dtype=torch.float64)
    undo = inf_grad(engine.model) if inf_grad is not None else None  # fault injection
    for pack in packs:
        coefficients = L.token_coefficients(pack, totals, policy)
        moved = pack.to(engine.device, non_blocking=True)
        with engine.autocast():
            hidden = module(moved, return_logits=False).hidden
            token_losses = L.token_cross_entropy(hidden, moved.labels, head=head, chunk_size=chunk)
        micro = L.weighted_loss(token_losses, coefficients.to(engine.device))
        if nan:
            micro = micro * float("nan")  # fault injection: a NaN this step
        engine.backward(micro)
        step_loss += micro.detach().double().cpu()
        _merge(result.by_source, L.loss_sums_by(moved, token_losses, "source"))
        _merge(result.by_task, L.loss_sums_by(moved, token_losses, "task"))
    if undo is not None:
        undo()
    result.loss = float(step_loss)
    return result


def pack_stats(
    result: StepResult,
    packs: list[PackedBatch],
    engine: Engine,
    llm_budget: int,
    vit_budget: int,
    trained: TrainedParts | None = None,
) -> None:
    """Add this rank's sizes, FLOPs (of the parts that run backward: `trained`, default all) and packing fill to
    `result` (summed over ranks in finish_step)."""
    trained = trained or TrainedParts()
    for pack in packs:
        result.tokens += pack.num_tokens
        result.samples += pack.num_samples
        result.supervised += int((pack.labels != L.IGNORE_INDEX).sum())
        result.patches += pack.num_patches
        result.flops += pack_flops(engine.model.cfg, pack).trained(trained)
        result.packs += 1
        result.llm_fill += pack.num_tokens / llm_budget
        result.vit_fill += pack.num_patches / vit_budget


def finish_step(engine: Engine, result: StepResult, guard: Guard, stop: bool) -> StepResult:
    """Sum the step's numbers over ranks, let the guard judge the global loss, and update (or skip)."""
    fields = ("loss", "tokens", "samples", "supervised", "patches", "flops", "packs", "llm_fill", "vit_fill")
    summed = D.all_reduce(
        torch.tensor([float(getattr(result, f)) for f in fields] + [float(stop)], dtype=torch.float64)
    )
    values = summed.tolist()
    for name, value in zip(fields, values):
        setattr(result, name, value if isinstance(getattr(result, name), float) else int(value))
    result.stop = values[-1] > 0
    gathered = D.all_gather_object((result.by_source, result.by_task))
    result.by_source, result.by_task = {}, {}
    for by_source, by_task in gathered:
        _merge(result.by_source, by_source)
        _merge(result.by_task, by_task)
    result.skipped = guard.check_loss(result.loss)
    report = engine.step(skip=result.skipped is not None)
    result.grad_norm = report.grad_norm
    if result.skipped is None and not report.applied:
        result.skipped = NONFINITE_GRAD  # the engine found the gradient norm not finite
    return result
