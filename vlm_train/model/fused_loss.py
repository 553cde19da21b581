"""The LM head and cross-entropy in one fused kernel, from liger-kernel (an option under the `gpu` extra).

liger's fused linear + cross-entropy makes the logits block by block inside Triton kernels and never holds them,
like our chunked loss (chunked_loss.py), but without the per-chunk recomputation. It needs CUDA and the
liger-kernel package; the CPU path and its tests never use it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..data.batch import IGNORE_INDEX


@functools.cache
def _liger_loss() -> type | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed, or a build that does not load: either way unusable
        return None
    return LigerFusedLinearCrossEntropyLoss


def liger_problem(device: torch.device) -> str | None:
    """Why the liger kernel cannot run on `device`, or None if it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device, got {device.type!r}"
    if _liger_loss() is None:
        return "the liger-kernel package is not installed (pip install 'vlm_train[gpu]')"
    return None


def liger_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [T] in fp32 of head(hidden) against labels (0 where IGNORE_INDEX), fused."""
    problem = liger_problem(hidden.device)
    if problem is not None:
        raise RuntimeError(f"loss.kernel=liger cannot run: {problem}; use loss.kernel=chunked")
    losses = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if rows.numel() == 0:
        return losses + 0.0 * head(hidden[:1]).float().sum()
    selected = hidden[rows]
    # Under autocast the hidden states are bf16 and the weight fp32: give the kernel one dtype, as F.linear would.
    weight = head.weight.to(selected.dtype)
    bias = None if head.bias is None else head.bias.to(selected.dtype)
    per_token = _liger_loss()(reduction="none")(weight, selected, labels[rows], bias)
    return losses.index_copy(0, rows, per_token.float())
