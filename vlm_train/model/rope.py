"""Rotary position embeddings: 1D / M-RoPE for the LLM, 2D (h, w) for the vision tower.

Both use the Qwen "rotate_half" layout: cos/sin are [T, head_dim] with the two halves equal.
"""

from __future__ import annotations

import functools
import math

import torch


def inv_frequencies(dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The dim/2 inverse frequencies theta^(-2i/dim), float32.

    Computed per forward rather than kept as a buffer: `model.to(bfloat16)` would round a buffer and
    shift every rotary angle.
    """
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def llama3_inv_frequencies(inv_freq: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3.x RoPE scaling: long wavelengths slowed by `factor`, a smooth blend between the two bands."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by cos/sin [T, D]; computed in float32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, 2*len(inv_freq)] for position_ids [3, T] (M-RoPE) or [T] (plain RoPE).

    As in Qwen2-VL, frequency chunk i of `mrope_section` takes its angle from row i (t, h, w).
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(3, -1)  # equal rows make M-RoPE plain RoPE
    if position_ids.dim() != 2 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [T] or [3, T], got {tuple(position_ids.shape)}")
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)  # [3, T, D/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def vision_positions(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(h, w) patch coordinates [P, 2] in merge order (each merge window's patches consecutive)."""
    rows = [_grid_positions(t, h, w, spatial_merge_size) for t, h, w in grid_thw.tolist()]
    if not rows:
        return torch.zeros(0, 2, dtype=torch.long, device=grid_thw.device)
    return torch.cat(rows).to(grid_thw.device)


@functools.lru_cache(maxsize=4096)
def _grid_positions(t: int, h: int, w: int, m: int) -> torch.Tensor:
    """One grid's coordinates (cached: a pack's images come in few sizes, and every pack asks again)."""
    if h % m or w % m:
        raise ValueError(f"image grid {h}x{w} patches is not divisible by spatial_merge_size {m}")
    hpos = torch.arange(h).unsqueeze(1).expand(h, w)
    wpos = torch.arange(w).unsqueeze(0).expand(h, w)
    # Same permutation the Qwen2-VL image processor applies to the patches themselves.
    hpos = hpos.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
    wpos = wpos.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
    return torch.stack([hpos, wpos], dim=-1).repeat(t, 1)


def vision_cos_sin(
    grid_thw: torch.Tensor, spatial_merge_size: int, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, head_dim] of the 2D rotary for every patch of the grids (merge order)."""
    return vision_cos_sin_at(vision_positions(grid_thw, spatial_merge_size), inv_freq)


def vision_cos_sin_at(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, head_dim] of the 2D rotary (Qwen2.5-VL `rot_pos_emb`) at (h, w) positions [P, 2]."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # [P, 2, head_dim/4]
    freqs = freqs.flatten(1)  # [P, head_dim/2]: h frequencies, then w frequencies
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
