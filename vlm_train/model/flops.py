"""Exact matmul FLOPs of one pack through the VLM, for MFU.

Convention (the one torchtitan, Megatron's MFU and torch.utils.flop_counter use):
- a matmul [m, k] x [k, n] is 2*m*k*n FLOPs; norms, activations, rotary, softmax and embedding lookups count 0;
- attention counts the full L x L square of every segment (causal or not): 4 * L^2 * heads * head_dim per layer,
  over the real segments: per sample in the LLM, per image (or window) in the ViT;
- training (forward + backward) is 3x the forward: backward does two matmuls per forward matmul. Recomputation
  (activation checkpointing, the chunked loss) is not counted: this is model FLOPs, not hardware FLOPs.
- in a stage that freezes parts, `PackFlops.trained` counts what runs: a frozen part that a trained part lies
  upstream of still passes gradients back (its matmuls' input gradients and attention's backward), and a frozen
  part with nothing trained upstream (the vision tower while only the projector learns) runs forward only. Pixels
  never need a gradient, so the patch embedding's input gradient is never counted there.

`sizes_flops` is the formula on a pack's sizes (`pack_flops` reads them off a PackedBatch); `flops_cost` gives
its terms as per-sample coefficients, with which the packer keeps each pack's FLOPs near the average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.batch import IGNORE_INDEX, PackedBatch
from ..data.pack_cost import FlopsCost
from .config import ModelConfig
from .vision_layout import pack_keep, vision_layout


@dataclass(frozen=True)
class TrainedParts:
    """Which parts of the VLM have trainable weights, in the order the forward runs them."""

    vision: bool = True
    projector: bool = True
    llm: bool = True  # the decoder layers, embeddings and final norm
    lm_head: bool = True

    @classmethod
    def of(cls, model: nn.Module) -> TrainedParts:
        head = model.llm.lm_head.weight  # with tied embeddings, the embedding table itself
        decoder = [p for p in model.llm.parameters() if p is not head]
        return cls(
            vision=any(p.requires_grad for p in model.vision.parameters()),
            projector=any(p.requires_grad for p in model.projector.parameters()),
            llm=any(p.requires_grad for p in decoder) or (head.requires_grad and model.cfg.llm.tie_word_embeddings),
            lm_head=head.requires_grad,
        )


@dataclass
class PackFlops:
    """Forward FLOPs of one pack by part (`*_attention`: the weightless share of a part); `training` is forward +
    backward with everything trained, `trained(parts)` with only some parts trained."""

    vision: int
    projector: int
    llm: int
    lm_head: int
    vision_attention: int = 0
    patch_embedding: int = 0
    llm_attention: int = 0

    @property
    def forward(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def training(self) -> int:
        return 3 * self.forward

    def trained(self, parts: TrainedParts) -> int:
        """Forward and the backward that runs when only `parts` have trainable weights."""
        # Pixels need no gradient: a trained vision tower skips its patch embedding's input gradient.
        total, upstream = -self.patch_embedding if parts.vision else 0, False
        for forward, attention, trains in (
            (self.vision, self.vision_attention, parts.vision),
            (self.projector, 0, parts.projector),
            (self.llm, self.llm_attention, parts.llm),
            (self.lm_head, 0, parts.lm_head),
        ):
            matmuls = forward - attention
            if trains:  # weight and input gradients of the matmuls, attention's backward
                total += 3 * forward
            elif upstream:  # input gradients only
                total += 2 * matmuls + 3 * attention
            else:
                total += forward
            upstream = upstream or trains
        return total


def _attention(lengths: list[int], width: int) -> int:
    """QK^T and PV over each segment: 2 matmuls of 2 * L * L * width."""
    return 4 * width * sum(n * n for n in lengths)


def _vit_per_patch(cfg: ModelConfig) -> int:
    """Patch embedding and every block's qkv, proj and SwiGLU (gate, up, down) for one patch."""
    v = cfg.vision
    d, inner = v.hidden_size, v.intermediate_size
    return 2 * v.patch_dim * d + v.depth * 2 * (3 * d * d + d * d + 3 * d * inner)


def _projector_per_unit(cfg: ModelConfig) -> int:
    """The merger MLP for one merge unit (one image token)."""
    merged = cfg.vision.hidden_size * cfg.vision.spatial_merge_size**2
    return 2 * (merged * merged + merged * cfg.llm.hidden_size)


def _llm_per_token(cfg: ModelConfig) -> int:
    """One decoder layer's q, k, v, o and SwiGLU for one token."""
    c = cfg.llm
    q_width, kv_width = c.num_heads * c.resolved_head_dim, c.num_kv_heads * c.resolved_head_dim
    return 2 * (c.hidden_size * (2 * q_width + 2 * kv_width) + 3 * c.hidden_size * c.intermediate_size)


def _head_per_token(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """The LM head for one row of logits."""
    return 2 * cfg.llm.hidden_size * (vocab_size or cfg.llm.vocab_size)


def vision_flops(cfg: ModelConfig, grid_thw: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[int, int]:
    """(vision tower, projector) forward FLOPs for the images of `grid_thw` (or the dummy image when there are none)."""
    return _vision_parts(cfg, grid_thw, keep)[:2]


def _vision_parts(cfg: ModelConfig, grid_thw: torch.Tensor, keep: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(vision tower, projector, the tower's attention, its patch embedding) forward FLOPs."""
    v = cfg.vision
    m = v.spatial_merge_size
    if grid_thw.shape[0] == 0:  # a pack without images runs one zero image of one merge window
        grid_thw, keep = torch.tensor([[1, m, m]]), None
    layout = vision_layout(grid_thw.cpu(), m, v.window_units, None if keep is None else keep.cpu())
    patches = layout.num_units * m * m
    full = _attention(layout.segment_lengths(windowed=False), v.hidden_size)
    windowed = _attention(layout.segment_lengths(windowed=True), v.hidden_size)
    blocks = sum(windowed if v.uses_window(i) else full for i in range(v.depth))
    tower, projector = patches * _vit_per_patch(cfg) + blocks, layout.num_units * _projector_per_unit(cfg)
    return tower, projector, blocks, patches * 2 * v.patch_dim * v.hidden_size


def llm_flops(cfg: ModelConfig, sample_lengths: list[int]) -> int:
    """Decoder-layer forward FLOPs (no LM head) for samples of these lengths."""
    c = cfg.llm
    width = c.num_heads * c.resolved_head_dim
    return c.num_layers * (sum(sample_lengths) * _llm_per_token(cfg) + _attention(sample_lengths, width))


def sizes_flops(
    cfg: ModelConfig,
    sample_lengths: list[int],
    head_tokens: int,
    grid_thw: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> PackFlops:
    """FLOPs of a pack from its sizes alone: sample lengths, LM-head rows, image grids and kept merge units."""
    if cfg.llm.vocab_size <= 0:
        raise ValueError("pack_flops needs llm.vocab_size; use the built model's cfg (model.cfg)")
    vision, projector, vision_attention, patch_embedding = _vision_parts(cfg, grid_thw, keep)
    width = cfg.llm.num_heads * cfg.llm.resolved_head_dim
    return PackFlops(
        vision=vision,
        projector=projector,
        llm=llm_flops(cfg, sample_lengths),
        lm_head=head_tokens * _head_per_token(cfg),
        vision_attention=vision_attention,
        patch_embedding=patch_embedding,
        llm_attention=cfg.llm.num_layers * _attention(sample_lengths, width),
    )


def pack_flops(cfg: ModelConfig, batch: PackedBatch, head_tokens: int | None = None) -> PackFlops:
    """FLOPs of `batch` through a model of `cfg` (llm.vocab_size set); the LM head runs on `head_tokens` rows.

    `head_tokens` defaults to the supervised tokens, which is all the chunked loss computes logits for; pass
    batch.num_tokens when the full logits are made.
    """
    keep = pack_keep(batch, cfg.vision.spatial_merge_size)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    if head_tokens is None:
        head_tokens = int((batch.labels != IGNORE_INDEX).sum())
    return sizes_flops(cfg, lengths, head_tokens, batch.image_grid_thw, keep)


def flops_cost(cfg: ModelConfig, vocab_size: int | None = None) -> FlopsCost:
    """The packer's per-sample training-FLOPs coefficients for a model of `cfg` (data.pack.flops_cost).

    The same terms as `sizes_flops`, times 3 (forward + backward); `vocab_size` overrides llm.vocab_size (0 there
    means: the tokenizer's size, which the model config does not know).
    """
    if not (vocab_size or cfg.llm.vocab_size) > 0:
        raise ValueError("flops_cost needs the vocabulary size: set llm.vocab_size or pass vocab_size")
    v, c = cfg.vision, cfg.llm
    windowed = sum(v.uses_window(i) for i in range(v.depth))
    empty = vision_flops(cfg, torch.zeros(0, 3, dtype=torch.long))
    return FlopsCost(
        token=3 * c.num_layers * _llm_per_token(cfg),
        token_pair=3 * c.num_layers * _attention([1], c.num_heads * c.resolved_head_dim),
        supervised=3 * _head_per_token(cfg, vocab_size),
        patch=3 * _vit_per_patch(cfg),
        unit=3 * _projector_per_unit(cfg),
        frame_pair=3 * (v.depth - windowed) * _attention([1], v.hidden_size),
        window_pair=3 * windowed * _attention([1], v.hidden_size),
        merge=v.spatial_merge_size,
        window_units=v.window_units if windowed else 0,
        no_image=3 * sum(empty),
    )
