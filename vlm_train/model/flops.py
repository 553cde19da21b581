"""Exact matmul FLOPs of one pack through the VLM, for MFU.

Convention (the one torchtitan, Megatron's MFU and torch.utils.flop_counter use):
- a matmul [m, k] x [k, n] is 2*m*k*n FLOPs; norms, activations, rotary, softmax and embedding lookups count 0;
- attention counts the full L x L square of every segment (causal or not): 4 * L^2 * heads * head_dim per layer,
  over the real segments: per sample in the LLM, per image (or window) in the ViT;
- training (forward + backward) is 3x the forward: backward does two matmuls per forward matmul. Recomputation
  (activation checkpointing, the chunked loss) is not counted: this is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batch import IGNORE_INDEX, PackedBatch
from .config import ModelConfig
from .vision_layout import pack_keep, vision_layout


@dataclass
class PackFlops:
    """Forward FLOPs of one pack by part; `training` is forward + backward."""

    vision: int
    projector: int
    llm: int
    lm_head: int

    @property
    def forward(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def training(self) -> int:
        return 3 * self.forward


def _attention(lengths: list[int], width: int) -> int:
    """QK^T and PV over each segment: 2 matmuls of 2 * L * L * width."""
    return 4 * width * sum(n * n for n in lengths)


def vision_flops(cfg: ModelConfig, grid_thw: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[int, int]:
    """(vision tower, projector) forward FLOPs for the images of `grid_thw` (or the dummy image when there are none)."""
    v = cfg.vision
    m = v.spatial_merge_size
    if grid_thw.shape[0] == 0:  # a pack without images runs one zero image of one merge window
        grid_thw, keep = torch.tensor([[1, m, m]]), None
    layout = vision_layout(grid_thw.cpu(), m, v.window_units, None if keep is None else keep.cpu())
    patches = layout.num_units * m * m
    d, inner = v.hidden_size, v.intermediate_size
    per_patch = 2 * (3 * d * d + d * d + 3 * d * inner)  # qkv, proj, SwiGLU (gate, up, down)
    full = _attention(layout.segment_lengths(windowed=False), d)
    windowed = _attention(layout.segment_lengths(windowed=True), d)
    blocks = sum(windowed if v.uses_window(i) else full for i in range(v.depth))
    tower = 2 * patches * v.patch_dim * d + v.depth * patches * per_patch + blocks
    merged = v.hidden_size * m * m
    projector = 2 * layout.num_units * (merged * merged + merged * cfg.llm.hidden_size)
    return tower, projector


def llm_flops(cfg: ModelConfig, sample_lengths: list[int]) -> int:
    """Decoder-layer forward FLOPs (no LM head) for samples of these lengths."""
    c = cfg.llm
    tokens = sum(sample_lengths)
    q_width, kv_width = c.num_heads * c.resolved_head_dim, c.num_kv_heads * c.resolved_head_dim
    per_token = 2 * (c.hidden_size * (2 * q_width + 2 * kv_width) + 3 * c.hidden_size * c.intermediate_size)
    return c.num_layers * (tokens * per_token + _attention(sample_lengths, q_width))


def pack_flops(cfg: ModelConfig, batch: PackedBatch, head_tokens: int | None = None) -> PackFlops:
    """FLOPs of `batch` through a model of `cfg` (llm.vocab_size set); the LM head runs on `head_tokens` rows.

    `head_tokens` defaults to the supervised tokens, which is all the chunked loss computes logits for; pass
    batch.num_tokens when the full logits are made.
    """
    if cfg.llm.vocab_size <= 0:
        raise ValueError("pack_flops needs llm.vocab_size; use the built model's cfg (model.cfg)")
    keep = pack_keep(batch, cfg.vision.spatial_merge_size)
    vision, projector = vision_flops(cfg, batch.image_grid_thw, keep)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    if head_tokens is None:
        head_tokens = int((batch.labels != IGNORE_INDEX).sum())
    lm_head = 2 * head_tokens * cfg.llm.hidden_size * cfg.llm.vocab_size
    return PackFlops(vision=vision, projector=projector, llm=llm_flops(cfg, lengths), lm_head=lm_head)
