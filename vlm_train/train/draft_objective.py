"""What a draft stage trains against: the frozen target's features and next-token distribution, the positions
each training-time-test step supervises, and the draft vocabulary.

The target's hidden states reach the draft in `eagle3.hidden_dtype` (bf16 by default) whether the target runs in
the loop (online) or they were stored (offline), so both train on the same numbers. Its next-token distribution
is its LM head over its final hidden state, restricted to the draft vocabulary and renormalised there (as
SpecForge). Step j at position t targets the distribution at t + 1 + j of the same sample; it is supervised when
that position has a label and the target's argmax there is in the draft vocabulary.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.devices import dtype_of
from vlm_train.model.draft import Eagle3Draft
from vlm_train.train.config import Eagle3Config

STORAGE_DTYPES = ("bfloat16", "float16")
LOGIT_ROWS = 2048  # target logits are computed this many rows at a time (a full-vocabulary row is large)


@dataclass
class TargetFeatures:
    """One pack's target hidden states in the storage precision: aux [T, 3D] (the draft's three layers) and
    final [T, D] (the final-normed state the LM head reads)."""

    aux: torch.Tensor
    final: torch.Tensor


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Modules in eval mode for the duration (the target runs as at inference: no token dropping)."""
    modules = list(modules)
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def target_features(vlm: nn.Module, batch: PackedBatch, layers: tuple[int, ...], dtype: str) -> TargetFeatures:
    """Run the frozen target over a pack (eval mode, no gradients) and keep what the draft reads."""
    with eval_mode([vlm.vision, vlm.projector, vlm.llm]):
        embeds = vlm.embed(batch)
        final, captured = vlm.llm.forward_capture(
            embeds, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, layers
        )
    storage = dtype_of(dtype)
    return TargetFeatures(torch.cat(captured, dim=-1).to(storage), final.to(storage))


def stored_features(batch: PackedBatch) -> TargetFeatures:
    """An offline pack's stored hidden states."""
    if batch.target_aux is None or batch.target_final is None:
        raise ValueError("eagle3.offline is set but the pack carries no stored hidden states")
    return TargetFeatures(batch.target_aux, batch.target_final)


@torch.no_grad()
def target_distribution(
    final: torch.Tensor, head_weight: torch.Tensor, draft: Eagle3Draft
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits over the draft vocabulary [T, N] (float32) and whether its argmax over the whole
    vocabulary is a draft token [T]."""
    ids = draft.draft_to_target.to(head_weight.device)
    weight = head_weight.float()
    logits, in_vocab = [], []
    for start in range(0, final.shape[0], LOGIT_ROWS):
        full = final[start : start + LOGIT_ROWS].float() @ weight.T
        logits.append(full[:, ids])
        in_vocab.append(draft.t2d[full.argmax(-1)])
    if not logits:
        return final.new_zeros(0, ids.numel(), dtype=torch.float32), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logits), torch.cat(in_vocab)


def step_masks(batch: PackedBatch, in_vocab: torch.Tensor, steps: int) -> torch.Tensor:
    """bool [K, T]: step j supervises position t when t + 1 + j lies in t's sample, has a label, and the target's
    argmax there is a draft token."""
    t = batch.num_tokens
    device = batch.labels.device
    bounds = batch.cu_seqlens.long().to(device)
    lengths = bounds[1:] - bounds[:-1]
    ends = torch.repeat_interleave(bounds[1:], lengths)
    target_ok = (batch.labels != IGNORE_INDEX) & in_vocab.to(device)
    index = torch.arange(t, device=device)
    masks = []
    for j in range(steps):
        source = index + 1 + j
        inside = source < ends
        masks.append(inside & target_ok[source.clamp(max=max(t - 1, 0))])
    return torch.stack(masks) if masks else torch.zeros(0, t, dtype=torch.bool, device=device)


def choose_vocabulary(label_batches: Iterable[torch.Tensor], size: int, target_vocab_size: int) -> torch.Tensor:
    """The `size` most frequent supervised target tokens (ties: the smaller id), topped up with the smallest unseen
    ids when the data has fewer distinct ones."""
    counts: collections.Counter[int] = collections.Counter()
    for labels in label_batches:
        counts.update(labels[labels != IGNORE_INDEX].tolist())
    ranked = sorted(counts, key=lambda token: (-counts[token], token))[:size]
    chosen = set(ranked)
    for token in range(target_vocab_size):
        if len(ranked) >= size:
            break
        if token not in chosen:
            ranked.append(token)
    return torch.tensor(sorted(ranked), dtype=torch.long)


def check_eagle3(cfg: Eagle3Config) -> None:
    """Clear errors for draft settings that cannot train."""
    if cfg.ttt_steps < 1:
        raise ValueError(f"eagle3.ttt_steps must be >= 1, got {cfg.ttt_steps}")
    if not 0 < cfg.step_weight <= 1:
        raise ValueError(f"eagle3.step_weight must be in (0, 1], got {cfg.step_weight}")
    if cfg.hidden_dtype not in STORAGE_DTYPES:
        raise ValueError(f"eagle3.hidden_dtype must be one of {STORAGE_DTYPES}, got {cfg.hidden_dtype!r}")
    if cfg.vocab_samples < 1:
        raise ValueError(f"eagle3.vocab_samples must be >= 1, got {cfg.vocab_samples}")
