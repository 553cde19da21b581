"""Weighted cross-entropy: a mix of per-sample and per-token averaging, normalised over the whole optimizer step."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.model.chunked_loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy


@dataclass
class StepTotals:
    """What the loss of one optimizer step is normalised by: summed over its micro-batches (and ranks)."""

    tokens: int  # supervised tokens
    samples: int  # samples with at least one supervised token

    def __add__(self, other: "StepTotals") -> "StepTotals":
        return StepTotals(self.tokens + other.tokens, self.samples + other.samples)


def _supervised_per_sample(batch: PackedBatch) -> torch.Tensor:
    supervised = batch.labels != IGNORE_INDEX
    return torch.bincount(batch.sample_index[supervised], minlength=batch.num_samples)


def pack_totals(batch: PackedBatch) -> StepTotals:
    counts = _supervised_per_sample(batch)
    return StepTotals(tokens=int(counts.sum()), samples=int((counts > 0).sum()))


def token_coefficients(batch: PackedBatch, totals: StepTotals, per_sample_weight: float) -> torch.Tensor:
    """Per-token weights whose sum over the step is 1: alpha/(S*x_s) + (1-alpha)/N on supervised tokens."""
    if not 0.0 <= per_sample_weight <= 1.0:
        raise ValueError(f"loss.per_sample_weight must be within [0, 1], got {per_sample_weight}")
    supervised = batch.labels != IGNORE_INDEX
    counts = _supervised_per_sample(batch).to(torch.float64)
    per_sample = 1.0 / (counts.clamp(min=1)[batch.sample_index] * max(totals.samples, 1))
    per_token = torch.full_like(per_sample, 1.0 / max(totals.tokens, 1))
    coefficients = per_sample_weight * per_sample + (1.0 - per_sample_weight) * per_token
    return (coefficients * supervised).to(torch.float32)


def token_cross_entropy(
    logits_or_hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Cross-entropy per token in fp32; 0 where the label is IGNORE_INDEX.

    Given `head` (the LM head), the first argument is the hidden states [T, D]: logits are then made for the
    supervised tokens only, `chunk_size` at a time, and never held for the whole pack (see chunked_loss).
    """
    if head is not None:
        return chunked_cross_entropy(logits_or_hidden, head, labels, chunk_size)
    return F.cross_entropy(logits_or_hidden.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def weighted_loss(token_losses: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the step loss; the shares of a step add up to the step loss."""
    return (token_losses * coefficients).sum()


def loss_sums_by(batch: PackedBatch, token_losses: torch.Tensor, field: str) -> dict[str, tuple[float, int]]:
    """Sum of token losses and supervised-token count per value of a meta field (source, task)."""
    supervised = batch.labels != IGNORE_INDEX
    sums = torch.bincount(batch.sample_index, weights=token_losses.detach().double() * supervised, minlength=batch.num_samples)
    counts = _supervised_per_sample(batch)
    result: dict[str, tuple[float, int]] = {}
    for meta, loss_sum, count in zip(batch.meta, sums.tolist(), counts.tolist()):
        key = str(meta.get(field, "?"))
        total, n = result.get(key, (0.0, 0))
        result[key] = (total + loss_sum, n + count)
    return result
