"""Weighted cross-entropy, normalised over the whole optimizer step (all micro-batches and all data-parallel ranks).

Every supervised token t of sample s (x_s supervised tokens) has a factor f_t = importance_s * (k_t + 1) ** -power,
k_t its index among the sample's supervised tokens. The averagings weight it by
    token:  f_t / sum f        sample: (f_t / x_s) / sum (f / x)        square: (f_t / sqrt x_s) / sum (f / sqrt x)
and mix = alpha * sample + (1 - alpha) * token. The sums run over the step, so a step's weights add up to 1 however
its samples are split into micro-batches and ranks: `pack_totals` of every pack, summed (and all-reduced), is what
`token_coefficients` divides by.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.model.chunked_loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy
from vlm_train.model.fused_loss import liger_cross_entropy
from vlm_train.train.config import LossConfig

AVERAGING = ("token", "sample", "square", "mix")
KERNELS = ("chunked", "liger")


def check_loss(cfg: LossConfig, where: str = "loss") -> None:
    """A clear error for a loss config that cannot work."""
    if cfg.averaging not in AVERAGING:
        raise ValueError(f"{where}: averaging {cfg.averaging!r} is not one of {AVERAGING}")
    if cfg.kernel not in KERNELS:
        raise ValueError(f"{where}: kernel {cfg.kernel!r} is not one of {KERNELS}")
    if not 0.0 <= cfg.per_sample_weight <= 1.0:
        raise ValueError(f"{where}: per_sample_weight must be within [0, 1], got {cfg.per_sample_weight}")
    bad = {k: v for k, v in cfg.source_weights.items() if not (math.isfinite(v) and v >= 0)}
    if bad or not math.isfinite(cfg.position_power):
        raise ValueError(f"{where}: source_weights must be finite and >= 0 ({bad}), position_power finite")


@dataclass
class StepTotals:
    """What the loss of one optimizer step is normalised by: summed over its micro-batches (and ranks)."""

    tokens: int  # supervised tokens
    samples: int  # samples with at least one supervised token
    token_weight: float = 0.0  # sum of f over supervised tokens
    sample_weight: float = 0.0  # sum of f / x_s
    square_weight: float = 0.0  # sum of f / sqrt(x_s)

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_tensor(self) -> torch.Tensor:
        """float64, for an all-reduce (sums of up to 2**53 tokens stay exact)."""
        return torch.tensor([float(getattr(self, f.name)) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StepTotals:
        v = values.tolist()
        return cls(int(v[0]), int(v[1]), *v[2:])


def _supervised_per_sample(batch: PackedBatch) -> torch.Tensor:
    supervised = batch.labels != IGNORE_INDEX
    return torch.bincount(batch.sample_index[supervised], minlength=batch.num_samples)


def _importance(batch: PackedBatch, cfg: LossConfig) -> torch.Tensor:
    """Per-sample importance [S] from the source and the sample's own field."""
    values = []
    for meta in batch.meta or [{}] * batch.num_samples:
        value = float(cfg.source_weights.get(str(meta.get("source")), 1.0))
        if cfg.importance_field and meta.get(cfg.importance_field) is not None:
            own = float(meta[cfg.importance_field])
            if not (math.isfinite(own) and own >= 0):
                raise ValueError(
                    f"sample {meta.get('key')}: loss importance {cfg.importance_field}={own} must be finite and >= 0"
                )
            value *= own
        values.append(value)
    return torch.tensor(values, dtype=torch.float64)


def _position_factor(batch: PackedBatch, supervised: torch.Tensor, power: float) -> torch.Tensor:
    """(k + 1) ** -power for a sample's k-th supervised token (0-based); CPU tensors."""
    running = supervised.long().cumsum(0)
    before = torch.zeros(batch.num_samples, dtype=torch.long)
    starts = batch.cu_seqlens[1:-1].long().cpu()
    before[1:] = running[starts - 1]  # supervised tokens of the samples before
    k = running - before[batch.sample_index.cpu()] - 1
    return (k.clamp(min=0) + 1).double() ** -power


def token_factors(batch: PackedBatch, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_t for every token, 0 where unsupervised; x_s per token) in float64 on the CPU."""
    supervised = (batch.labels != IGNORE_INDEX).cpu()
    index = batch.sample_index.cpu()
    factors = supervised.double()
    if cfg.source_weights or cfg.importance_field:
        factors = factors * _importance(batch, cfg)[index]
    if cfg.position_power != 0.0:
        factors = factors * _position_factor(batch, supervised, cfg.position_power)
    counts = _supervised_per_sample(batch).cpu().double()
    return factors, counts.clamp(min=1)[index]


def pack_totals(batch: PackedBatch, cfg: LossConfig | None = None) -> StepTotals:
    """This pack's share of the step's normalisers."""
    cfg = cfg or LossConfig()
    counts = _supervised_per_sample(batch)
    factors, x = token_factors(batch, cfg)
    return StepTotals(
        tokens=int(counts.sum()),
        samples=int((counts > 0).sum()),
        token_weight=float(factors.sum()),
        sample_weight=float((factors / x).sum()),
        square_weight=float((factors / x.sqrt()).sum()),
    )


def _share(numerator: torch.Tensor, total: float) -> torch.Tensor:
    return numerator / total if total > 0 else torch.zeros_like(numerator)


def token_coefficients(batch: PackedBatch, totals: StepTotals, cfg: LossConfig | float) -> torch.Tensor:
    """Per-token weights (fp32, on the batch's device) whose sum over the whole step is 1.

    `cfg` may be a bare alpha: the mix of per-sample and per-token averaging with no other factor.
    """
    if not isinstance(cfg, LossConfig):
        cfg = LossConfig(averaging="mix", per_sample_weight=float(cfg))
    check_loss(cfg)
    factors, x = token_factors(batch, cfg)
    token = _share(factors, totals.token_weight)
    if cfg.averaging == "token":
        weights = token
    elif cfg.averaging == "square":
        weights = _share(factors / x.sqrt(), totals.square_weight)
    else:
        sample = _share(factors / x, totals.sample_weight)
        alpha = 1.0 if cfg.averaging == "sample" else cfg.per_sample_weight
        weights = alpha * sample + (1.0 - alpha) * token
    return weights.to(device=batch.labels.device, dtype=torch.float32)


def token_cross_entropy(
    logits_or_hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kernel: str = "chunked",
) -> torch.Tensor:
    """Cross-entropy per token in fp32; 0 where the label is IGNORE_INDEX.

    Given `head` (the LM head), the first argument is the hidden states [T, D]: logits are then made for the
    supervised tokens only, `chunk_size` at a time, and never held for the whole pack (see chunked_loss).
    chunk_size=0 makes them in one call of the head, kept for backward (no recomputation). kernel="liger" runs
    head and loss as liger-kernel's fused kernel instead (CUDA; see model/fused_loss.py).
    """
    if head is not None and kernel == "liger":
        return liger_cross_entropy(logits_or_hidden, head, labels)
    if head is not None and chunk_size > 0:
        return chunked_cross_entropy(logits_or_hidden, head, labels, chunk_size)
    if head is not None:
        return _one_call_cross_entropy(logits_or_hidden, head, labels)
    return F.cross_entropy(logits_or_hidden.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def _one_call_cross_entropy(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """The head called exactly once per pack, as ZeRO-3 needs (each call gathers its weight on every rank)."""
    losses = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if rows.numel() == 0:
        return losses + 0.0 * head(hidden[:1]).float().sum()
    return losses.index_copy(0, rows, F.cross_entropy(head(hidden[rows]).float(), labels[rows], reduction="none"))


def weighted_loss(token_losses: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the step loss; the shares of a step (all ranks) add up to the step loss."""
    return (token_losses * coefficients).sum()


def sample_loss_sums(batch: PackedBatch, token_losses: torch.Tensor) -> torch.Tensor:
    """[S, 2] float64 on the losses' device: each sample's summed token loss and supervised-token count."""
    supervised = (batch.labels != IGNORE_INDEX).double()
    sums = torch.zeros(batch.num_samples, 2, dtype=torch.float64, device=token_losses.device)
    values = torch.stack([token_losses.detach().double() * supervised, supervised], dim=1)
    return sums.index_add_(0, batch.sample_index, values)


def loss_sums_by(batch: PackedBatch, token_losses: torch.Tensor, field: str) -> dict[str, tuple[float, int]]:
    """Sum of token losses and supervised-token count per value of a meta field (source, task)."""
    result: dict[str, tuple[float, int]] = {}
    for meta, (loss_sum, count) in zip(batch.meta, sample_loss_sums(batch, token_losses).tolist()):
        key = str(meta.get(field, "?"))
        total, n = result.get(key, (0.0, 0))
        result[key] = (total + loss_sum, n + int(count))
    return result
