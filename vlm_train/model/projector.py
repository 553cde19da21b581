"""Qwen2.5-VL patch merger: each 2x2 window of vision features -> one LLM token."""

from __future__ import annotations

import torch
from torch import nn

from .norm import RMSNorm


class PatchMerger(nn.Module):
    """RMSNorm, concatenate merge_size^2 consecutive patches (one window in merge order), GELU MLP to LLM width."""

    def __init__(self, vision_hidden: int, llm_hidden: int, spatial_merge_size: int = 2, eps: float = 1e-6) -> None:
        super().__init__()
        self.unit = spatial_merge_size**2
        self.merged_dim = vision_hidden * self.unit
        self.ln_q = RMSNorm(vision_hidden, eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, llm_hidden),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[P, vision_hidden] -> [P / merge_size^2, llm_hidden]."""
        if x.shape[0] % self.unit:
            raise ValueError(f"{x.shape[0]} patches cannot be merged in groups of {self.unit}")
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))
