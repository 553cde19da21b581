"""One optimizer step: the step's normalisers all-reduced first, then forward and backward per micro-batch, then
the guarded update. Every rank computes the same global loss, so every rank takes the same decision."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.data.formats import TASKS
from vlm_train.train import distributed as D
from vlm_train.train import loss as L
from vlm_train.train.config import LossConfig
from vlm_train.train.engines import Engine
from vlm_train.train.guards import NONFINITE_GRAD, Guard, StepFaults

NO_FAULTS = StepFaults()

Sums = dict[str, tuple[float, int]]
OTHER = "other"  # the group of a source or task that LossGroups does not name


@dataclass(frozen=True)
class LossGroups:
    """The names a step's token losses are summed under, per source and per task. Every rank must list the same
    names in the same order: the sums travel in one all-reduced tensor."""

    sources: tuple[str, ...]
    tasks: tuple[str, ...] = TASKS

    @classmethod
    def of(cls, packs: list[PackedBatch]) -> LossGroups:
        """The sources of these packs (one process only: other ranks' packs may name others)."""
        return cls(tuple(sorted({str(m.get("source")) for p in packs for m in p.meta})))

    @property
    def names(self) -> list[tuple[str, str]]:
        """(field, name) of every row of the sums, with an OTHER row per field."""
        return [("source", n) for n in (*self.sources, OTHER)] + [("task", n) for n in (*self.tasks, OTHER)]

    def rows(self, pack: PackedBatch) -> tuple[list[int], list[int]]:
        """The row of each sample of the pack in the sums: for its source, and for its task."""
        sources = {n: i for i, n in enumerate(self.sources)}
        tasks = {n: len(self.sources) + 1 + i for i, n in enumerate(self.tasks)}
        meta = pack.meta or [{}] * pack.num_samples
        return (
            [sources.get(str(m.get("source")), len(self.sources)) for m in meta],
            [tasks.get(str(m.get("task")), len(self.sources) + 1 + len(self.tasks)) for m in meta],
        )


@dataclass
class StepResult:
    """What one optimizer step did, summed over all ranks (after finish_step; before it, this rank's share)."""

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
    # This rank's loss sums and supervised-token counts per group, on the device until finish_step adds them up.
    groups: LossGroups | None = None
    group_sums: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)  # figures already global (a vision stage's objectives)


def forward_backward(
    engine: Engine,
    packs: list[PackedBatch],
    policy: LossConfig,
    faults: StepFaults = NO_FAULTS,
    groups: LossGroups | None = None,
) -> StepResult:
    """Forward and backward of the VLM's token loss over this rank's micro-batches, each weighted by the step's
    global normalisers.

    Nothing here waits for the device until the end, where the step's loss is read once (the guard needs it before
    the update anyway); the per-source and per-task sums stay on the device for finish_step's one all-reduce.
    """
    local = sum((L.pack_totals(p, policy) for p in packs), L.StepTotals(0, 0))
    totals = L.StepTotals.from_tensor(D.all_reduce(local.to_tensor()))  # CPU numbers: no wait on the device
    # A head gathered at each call (ZeRO-3) must be called alike on every rank: one call per pack.
    chunk = L.DEFAULT_CHUNK_SIZE if engine.head_whole_after_forward else 0
    if policy.kernel == "liger" and not engine.head_whole_after_forward:
        raise ValueError(
            f"loss.kernel=liger reads the LM head's weight whole, which {engine.describe()} shards: use "
            "loss.kernel=chunked (or an engine that keeps whole weights, e.g. DeepSpeed ZeRO 0-2)"
        )
    module, head, device = engine.forward_module(), engine.model.llm.lm_head, engine.device
    groups = groups or LossGroups.of(packs)
    sums = torch.zeros(len(groups.names), 2, dtype=torch.float64, device=device)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for pack in packs:
        coefficients = L.token_coefficients(pack, totals, policy)
        source_rows, task_rows = groups.rows(pack)
        moved = pack.to(device, non_blocking=True)
        with engine.autocast():
            hidden = module(moved, return_logits=False).hidden
            token_losses = L.token_cross_entropy(hidden, moved.labels, head, chunk, policy.kernel)
        micro = faults.loss(L.weighted_loss(token_losses, coefficients.to(device)))
        engine.backward(micro)
        step_loss += micro.detach().double()
        per_sample = L.sample_loss_sums(moved, token_losses)  # [S, 2]: loss sum, supervised tokens
        rows = torch.tensor(source_rows + task_rows, device=device)
        sums.index_add_(0, rows, torch.cat([per_sample, per_sample]))
    return StepResult(loss=float(step_loss), groups=groups, group_sums=sums)


def pack_stats(
    result: StepResult,
    packs: list[PackedBatch],
    llm_budget: int,
    vit_budget: int,
    flops: Callable[[PackedBatch], float],
) -> None:
    """Add this rank's sizes, training FLOPs (`flops` of each pack: what its stage kind counts) and packing fill
    to `result` (summed over ranks in finish_step); the packs are the loader's, on the host."""
    for pack in packs:
        result.tokens += pack.num_tokens
        result.samples += pack.num_samples
        result.supervised += int((pack.labels != L.IGNORE_INDEX).sum())
        result.patches += pack.num_patches
        result.flops += flops(pack)
        result.packs += 1
        result.llm_fill += pack.num_tokens / llm_budget
        result.vit_fill += pack.num_patches / vit_budget


def finish_step(engine: Engine, result: StepResult, guard: Guard, stop: bool) -> StepResult:
    """Sum the step's numbers over ranks (one all-reduce, one read), let the guard judge the global loss, and update
    (or skip)."""
    fields = ("loss", "tokens", "samples", "supervised", "patches", "flops", "packs", "llm_fill", "vit_fill")
    scalars = torch.tensor([float(getattr(result, f)) for f in fields] + [float(stop)], dtype=torch.float64)
    sums = result.group_sums
    if sums is None:
        sums = torch.zeros(0, 2, dtype=torch.float64)
    summed = D.all_reduce(torch.cat([scalars.to(sums.device), sums.flatten()]))
    values = summed.tolist()
    for name, value in zip(fields, values):
        setattr(result, name, value if isinstance(getattr(result, name), float) else int(value))
    result.stop = values[len(fields)] > 0
    result.by_source, result.by_task = {}, {}
    group_values = values[len(fields) + 1 :]
    for i, (kind, name) in enumerate(result.groups.names if result.groups is not None else []):
        total, count = group_values[2 * i], int(group_values[2 * i + 1])
        if count:
            (result.by_source if kind == "source" else result.by_task)[name] = (total, count)
    result.skipped = guard.check_loss(result.loss)
    report = engine.step(skip=result.skipped is not None)
    result.grad_norm = report.grad_norm
    if result.skipped is None and not report.applied:
        result.skipped = NONFINITE_GRAD  # the engine found the gradient norm not finite
    return result
