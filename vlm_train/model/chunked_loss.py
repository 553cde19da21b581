"""Cross-entropy from hidden states through the LM head, a chunk of tokens at a time.

Only supervised tokens get logits, `chunk_size` rows at once, and each chunk's logits are recomputed in backward
(activation checkpointing per chunk), so neither the forward nor the saved state ever holds [T, vocab] logits:
memory scales with chunk_size x vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batch import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 2048


def _chunk_losses(
    hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token cross-entropy [T] in fp32 of head(hidden) against labels; 0 where the label is IGNORE_INDEX."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    losses = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if rows.numel() == 0:
        # Still run the head (on one row, weighted 0): every rank must touch the same parameters (ZeRO-3 / DDP).
        return losses + 0.0 * head(hidden[:1]).float().sum()
    recompute = torch.is_grad_enabled()
    chunks = []
    for h, y in zip(hidden[rows].split(chunk_size), labels[rows].split(chunk_size)):
        if recompute:
            chunks.append(checkpoint(_chunk_losses, h, y, head, use_reentrant=False))
        else:
            chunks.append(_chunk_losses(h, y, head))
    return losses.index_copy(0, rows, torch.cat(chunks))
