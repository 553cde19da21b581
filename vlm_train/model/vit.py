"""NaViT-style vision tower (Qwen2.5-VL layout) over the packed patches of many images.

Submodule names mirror HF `Qwen2_5_VisionTransformerPretrainedModel`, so importing its weights is a rename
(plus reshaping the Conv3d patch embedding into our Linear).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.image import PIXEL_SCALE, PIXEL_SHIFT
from .attention import varlen_attention
from .config import VisionConfig
from .mlp import SwiGLU
from .norm import RMSNorm
from .rope import apply_rotary, inv_frequencies, vision_cos_sin_at
from .vision_layout import VisionLayout, vision_layout


def float_pixel_values(pixel_values: torch.Tensor, patch_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loader patches uint8 [P, C*p*p] -> HF's normalised pixel_values [P, patch_dim = C*t*p*p] in `dtype`.

    Normalises in float32 with data.image's constants, then repeats the frame t times (rows that already hold all
    t frames are only normalised): the values equal data.image.normalise_patches, on any device, before the cast.
    """
    if pixel_values.dtype != torch.uint8 or pixel_values.dim() != 2:
        raise ValueError(f"expected uint8 pixels [P, C*p*p], got {pixel_values.dtype} {list(pixel_values.shape)}")
    n, width = pixel_values.shape
    if width == 0 or width % 3 or patch_dim % width:
        raise ValueError(f"uint8 pixel rows of {width} values do not repeat into patches of {patch_dim}")
    # Rows are (C, frames, p, p): the frames repeated after normalising (no float copy before).
    values = normalised_pixels(pixel_values).view(n, 3, 1, width // 3)
    out = torch.empty((n, 3, patch_dim // width, width // 3), dtype=dtype, device=pixel_values.device)
    return out.copy_(values.expand_as(out)).view(n, patch_dim)


def normalised_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Loader patches uint8 [P, C*p*p] (or [P, C*t*p*p]) -> the same rows normalised in float32, nothing repeated."""
    n, width = pixel_values.shape
    scale, shift = _normalisation(pixel_values.device)
    # Rows are (C, frames, p, p): one multiply-add per channel.
    values = pixel_values.reshape(n, 3, 1, width // 3).to(torch.float32).mul_(scale).add_(shift)
    return values.view(n, width)


@functools.lru_cache(maxsize=8)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: a host-to-device copy in every forward would wait for the queued GPU work.
    as_tensor = lambda a: torch.from_numpy(a).to(device).view(1, 3, 1, 1)
    return as_tensor(PIXEL_SCALE), as_tensor(PIXEL_SHIFT)


class PatchEmbed(nn.Module):
    """Patch -> hidden; HF's Conv3d with kernel == stride is this Linear over the flattened patch [C*t*p*p].

    Takes the loader's uint8 pixels [P, C*p*p] (one frame; or all t frames), normalised here, on the device, or
    float pixel_values [P, C*t*p*p] already normalised (what HF's image processor gives). A still image's one frame
    stands for t equal frames, and the Conv3d over t equal frames is a Conv2d with the kernel summed over time: so
    one-frame rows meet the folded kernel [hidden, C*p*p] (1/t of the FLOPs, no repeated copy of the pixels) and
    the gradient reaches every temporal slice of the kernel alike, as through the repeat. Rows of t real frames
    (videos) keep the full kernel.
    """

    def __init__(self, patch_dim: int, hidden_size: int, temporal_patch_size: int = 1) -> None:
        super().__init__()
        self.temporal_patch_size = temporal_patch_size  # the frames a one-frame uint8 patch is repeated into
        self.proj = nn.Linear(patch_dim, hidden_size, bias=False)

    def check(self, pixel_values: torch.Tensor) -> None:
        """Raise a clear error unless rows are uint8 of C*p*p or C*t*p*p values, or float of C*t*p*p."""
        width, patch_dim = pixel_values.shape[-1], self.proj.in_features
        if pixel_values.dtype == torch.uint8:
            if width not in (patch_dim // self.temporal_patch_size, patch_dim):
                raise ValueError(
                    f"uint8 pixel_values rows have {width} values, expected C*p*p = "
                    f"{patch_dim // self.temporal_patch_size} (one frame) or C*t*p*p = {patch_dim}"
                )
        elif not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be uint8 (raw pixels) or float (normalised), got {pixel_values.dtype}")
        elif width != patch_dim:
            raise ValueError(
                f"pixel_values rows have {width} values, expected C*t*p*p = {patch_dim} for the vision "
                "config (float pixel_values are normalised patches with all t frames)"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check(pixel_values)
        weight = self.proj.weight
        if pixel_values.dtype != torch.uint8:
            return self.proj(pixel_values.to(weight.dtype))
        pixels = normalised_pixels(pixel_values).to(weight.dtype)
        if pixel_values.shape[-1] == self.proj.in_features:  # all t frames given
            return self.proj(pixels)
        # Rows are (C=3, frames, p, p), so the kernel's time axis sits between channel and pixel.
        folded = weight.view(weight.shape[0], 3, self.temporal_patch_size, -1).sum(2)
        return F.linear(pixels, folded.flatten(1))


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
        self.patch_embed = PatchEmbed(cfg.patch_dim, cfg.hidden_size, cfg.temporal_patch_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg, attn_backend) for _ in range(cfg.depth))

    def layout(self, grid_thw: torch.Tensor, keep: torch.Tensor | None = None) -> VisionLayout:
        """Positions, segments and window order of a pack's images under this tower's config."""
        return vision_layout(grid_thw, self.cfg.spatial_merge_size, self.cfg.window_units, keep)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values uint8 [P, C*p*p] or float [P, C*t*p*p] (see PatchEmbed), grid_thw [N, 3] -> [P_kept, hidden].

        `keep` (bool, one flag per merge window of all images) drops whole merge windows; pixel_values may hold
        every patch (dropped ones are skipped here) or only the kept ones.
        """
        self.patch_embed.check(pixel_values)
        total = int(grid_thw.prod(-1).sum())
        layout = self.layout(grid_thw, keep)
        unit = self.cfg.spatial_merge_size**2
        kept = layout.num_units * unit
        if pixel_values.shape[0] == total and kept != total:
            pixel_values = pixel_values[keep.to(pixel_values.device).repeat_interleave(unit)]
        elif pixel_values.shape[0] != kept:
            dropped = f" ({kept} kept after token dropping)" if kept != total else ""
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                f"{grid_thw.tolist()} implies {total}{dropped}"
            )

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
