"""NaViT-style vision tower (Qwen2.5-VL layout) over the packed patches of many images.

Submodule names mirror HF `Qwen2_5_VisionTransformerPretrainedModel`, so importing its weights is a rename
(plus reshaping the Conv3d patch embedding into our Linear).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .config import VisionConfig
from .mlp import SwiGLU
from .norm import RMSNorm
from .rope import apply_rotary, inv_frequencies, vision_cos_sin_at
from .vision_layout import VisionLayout, vision_layout


class PatchEmbed(nn.Module):
    """Flattened patch [C*t*p*p] -> hidden; HF's Conv3d with kernel == stride is this Linear."""

    def __init__(self, patch_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention confined to each image, with 2D rotary q/k."""

    def __init__(self, cfg: VisionConfig, attn_backend: str) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, backend=self.attn_backend)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig, attn_backend: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg, attn_backend)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patches of N images (merge order) -> per-patch features [P, hidden]; no final norm (the merger has it).

    Window attention (Qwen2.5-VL): the patches are permuted into window order once, blocks outside
    `fullatt_block_indexes` get the window segments as their cu_seqlens, and the output is permuted back.
    """

    def __init__(self, cfg: VisionConfig, attn_backend: str = "auto", activation_checkpointing: bool = False) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(cfg.patch_dim, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg, attn_backend) for _ in range(cfg.depth))

    def layout(self, grid_thw: torch.Tensor, keep: torch.Tensor | None = None) -> VisionLayout:
        """Positions, segments and window order of a pack's images under this tower's config."""
        return vision_layout(grid_thw, self.cfg.spatial_merge_size, self.cfg.window_units, keep)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values [P, C*t*p*p], grid_thw [N, 3] -> [P_kept, hidden] in merge order.

        `keep` (bool, one flag per merge window of all images) drops whole merge windows; pixel_values may hold
        every patch (dropped ones are skipped here) or only the kept ones.
        """
        if pixel_values.shape[-1] != self.cfg.patch_dim:
            raise ValueError(f"pixel_values rows have {pixel_values.shape[-1]} values, expected C*t*p*p = "
                             f"{self.cfg.patch_dim} for the vision config")
        total = int(grid_thw.prod(-1).sum())
        layout = self.layout(grid_thw, keep)
        unit = self.cfg.spatial_merge_size**2
        kept = layout.num_units * unit
        if pixel_values.shape[0] == total and kept != total:
            pixel_values = pixel_values[keep.to(pixel_values.device).repeat_interleave(unit)]
        elif pixel_values.shape[0] != kept:
            dropped = f" ({kept} kept after token dropping)" if kept != total else ""
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                             f"{grid_thw.tolist()} implies {total}{dropped}")

        x = self.patch_embed(pixel_values)
        # head_dim/2 rotary dims per axis (h, w).
        inv_freq = inv_frequencies(self.cfg.head_dim // 2, self.cfg.rope_theta, x.device)
        cos, sin = vision_cos_sin_at(layout.positions, inv_freq)
        order = layout.window_order
        if order is not None:
            x, cos, sin = (_permute_units(y, order, unit) for y in (x, cos, sin))
        for index, block in enumerate(self.blocks):
            if self.cfg.uses_window(index):
                cu_seqlens, max_seqlen = layout.cu_window_seqlens, layout.max_window_seqlen
            else:
                cu_seqlens, max_seqlen = layout.cu_seqlens, layout.max_seqlen
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, cos, sin, cu_seqlens, max_seqlen)
        if order is not None:
            x = _permute_units(x, torch.argsort(order), unit)
        return x


def _permute_units(x: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder rows of x [U*unit, ...] by whole merge units: unit i of the result is unit order[i] of x."""
    return x.reshape(-1, unit, *x.shape[1:])[order].reshape(x.shape)
