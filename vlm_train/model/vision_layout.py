"""Where each patch of a pack goes in the vision tower: rotary positions, attention segments, window order.

Everything here is derived from `image_grid_thw` (and an optional keep mask of merge windows), the same way
Hugging Face's Qwen2.5-VL derives it, so an imported vision tower sees exactly the segments it was trained with.

Terms: a *merge unit* is one spatial_merge_size x spatial_merge_size group of patches (one LLM token). Patches are
laid out in merge order: image by image, frame by frame, units in raster order, the patches of a unit consecutive.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .rope import vision_positions


@dataclass
class VisionLayout:
    """The per-pack index tensors the vision tower needs (all on the device of `grid_thw`)."""

    positions: torch.Tensor  # long [P, 2]: (row, column) of every kept patch, merge order
    cu_seqlens: torch.Tensor  # int32: full-attention segments, one per image frame
    max_seqlen: int
    num_units: int  # kept merge units = LLM tokens the images give
    window_order: torch.Tensor | None = None  # long [num_units]: unit permutation into window order
    cu_window_seqlens: torch.Tensor | None = None  # int32: window segments, in window order
    max_window_seqlen: int = 0

    def segment_lengths(self, windowed: bool) -> list[int]:
        """Patch counts of the attention segments (full or windowed), for FLOPs counting."""
        cu = self.cu_window_seqlens if windowed and self.cu_window_seqlens is not None else self.cu_seqlens
        return (cu[1:] - cu[:-1]).tolist()


def units_per_image(grid_thw: torch.Tensor, merge: int) -> list[int]:
    """Merge units (LLM tokens before dropping) of each image."""
    return [t * (h // merge) * (w // merge) for t, h, w in grid_thw.tolist()]


def _window_index(t: int, units_h: int, units_w: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL `get_window_index` for one image: unit order and the window id of each unit in that order.

    Windows are window x window units, tiled from the top-left; partial windows at the edges stay small.
    """
    index = torch.arange(t * units_h * units_w).reshape(t, units_h, units_w)
    pad_h, pad_w = -units_h % window, -units_w % window
    padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
    nh, nw = (units_h + pad_h) // window, (units_w + pad_w) // window
    padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, window * window)
    window_id = torch.arange(t * nh * nw).unsqueeze(1).expand_as(padded)
    real = padded >= 0
    return padded[real], window_id[real]


@functools.lru_cache(maxsize=4096)
def _whole_grid_windows(t: int, units_h: int, units_w: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image's unit order and window sizes when it keeps every unit (cached: packs repeat the same few grids;
    callers never modify them)."""
    order, window_id = _window_index(t, units_h, units_w, window)
    return order, torch.bincount(window_id, minlength=int(window_id.max()) + 1)


def _segments(lengths: torch.Tensor, unit: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) of non-empty segments of `lengths` units each, and the longest segment in patches."""
    lengths = lengths[lengths > 0] * unit
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    return cu, int(lengths.max()) if lengths.numel() else 0


def check_keep(keep: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Validate a keep mask over merge units and return it as a bool tensor on the CPU."""
    total = sum(units_per_image(grid_thw, merge))
    if keep.dim() != 1 or keep.shape[0] != total:
        raise ValueError(
            f"vit keep mask must be one flag per merge window ({total} for grids "
            f"{grid_thw.tolist()}), got shape {tuple(keep.shape)}"
        )
    if keep.dtype != torch.bool:
        raise ValueError(f"vit keep mask must be bool, got {keep.dtype}")
    return keep.cpu()


def vision_layout(
    grid_thw: torch.Tensor, merge: int, window_units: int = 0, keep: torch.Tensor | None = None
) -> VisionLayout:
    """Positions, full-attention segments and (if `window_units`) window order for the kept patches of a pack.

    `keep` is a bool mask over the merge units of all images (merge order); dropped units vanish from every
    output, so the tower runs on kept patches only and windows shrink accordingly.
    """
    device = grid_thw.device
    grids = grid_thw.tolist()
    for _, h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"image grid {h}x{w} patches is not divisible by spatial_merge_size {merge}")
    unit = merge * merge
    sizes = units_per_image(grid_thw, merge)
    keep_cpu = check_keep(keep, grid_thw, merge) if keep is not None else torch.ones(sum(sizes), dtype=torch.bool)
    rank = keep_cpu.long().cumsum(0) - 1  # index of each unit among the kept ones

    positions = vision_positions(grid_thw.cpu(), merge)
    frame_lengths, orders, window_lengths = [], [], []
    offset = 0
    for (t, h, w), size in zip(grids, sizes):
        if keep is None:  # every unit kept: the image's layout depends on its grid alone
            frame_lengths.append(torch.full((t,), size // t))
            if window_units:
                order, lengths = _whole_grid_windows(t, h // merge, w // merge, window_units)
                orders.append(order + offset)
                window_lengths.append(lengths)
        else:
            kept = keep_cpu[offset : offset + size]
            frame_lengths.append(kept.view(t, -1).sum(1))
            if window_units:
                order, window_id = _window_index(t, h // merge, w // merge, window_units)
                in_window = kept[order]
                orders.append(rank[offset + order[in_window]])
                window_lengths.append(torch.bincount(window_id[in_window], minlength=int(window_id.max()) + 1))
        offset += size

    empty = torch.zeros(0, dtype=torch.long)
    cu, max_len = _segments(torch.cat(frame_lengths) if frame_lengths else empty, unit, device)
    layout = VisionLayout(
        positions=positions[keep_cpu.repeat_interleave(unit)].to(device),
        cu_seqlens=cu,
        max_seqlen=max_len,
        num_units=int(keep_cpu.sum()),
    )
    if window_units:
        layout.window_order = (torch.cat(orders) if orders else empty).to(device)
        layout.cu_window_seqlens, layout.max_window_seqlen = _segments(
            torch.cat(window_lengths) if window_lengths else empty, unit, device
        )
    return layout


def keep_from_patch_positions(
    positions: torch.Tensor, grid_thw: torch.Tensor, vit_cu_seqlens: torch.Tensor, merge: int
) -> torch.Tensor:
    """The keep mask of a pack whose kept patches are given by their (row, column) [P, 2] (PackedBatch.patch_positions).

    vit_cu_seqlens bound each image's kept patches. Patches must come in whole merge windows, in merge order. A video
    (t > 1 temporal patches) stacks its temporal patches' rows: temporal patch k's row r is given as k*h + r, so a
    window's time is known even when whole frames' windows are dropped.
    """
    unit = merge * merge
    grids, bounds = grid_thw.tolist(), vit_cu_seqlens.tolist()
    positions = positions.cpu()
    if len(bounds) != len(grids) + 1 or bounds[-1] != positions.shape[0]:
        raise ValueError(
            f"patch_positions ({positions.shape[0]} rows) and vit_cu_seqlens {bounds} do not fit {len(grids)} images"
        )
    masks = []
    for (t, h, w), start, end in zip(grids, bounds[:-1], bounds[1:]):
        if (end - start) % unit:
            raise ValueError(f"an image keeps {end - start} patches, not whole merge windows of {unit}")
        first = positions[start:end:unit]
        units = (first[:, 0] // merge) * (w // merge) + first[:, 1] // merge  # rows run over all t*h stacked rows
        keep = torch.zeros(t * (h // merge) * (w // merge), dtype=torch.bool)
        if units.numel() and (units.min() < 0 or units.max() >= keep.numel()):
            raise ValueError(f"patch_positions name merge windows outside grid {[t, h, w]}")
        keep[units] = True
        masks.append(keep)
    keep = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    stacked = torch.tensor([[1, t * h, w] for t, h, w in grids], dtype=torch.long).reshape(-1, 3)
    expected = vision_positions(stacked, merge)[keep.repeat_interleave(unit)]
    if not torch.equal(expected, positions):
        raise ValueError("patch_positions must list whole merge windows, each image's in merge order")
    return keep


def pack_keep(batch: Any, merge: int) -> torch.Tensor | None:
    """The merge windows a PackedBatch keeps (from its patch_positions), or None when it drops nothing."""
    positions = getattr(batch, "patch_positions", None)
    if positions is None or batch.image_grid_thw.shape[0] == 0:
        return None
    return keep_from_patch_positions(positions, batch.image_grid_thw, batch.vit_cu_seqlens, merge)


def random_keep(
    grid_thw: torch.Tensor, merge: int, drop_rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A keep mask that drops round(drop_rate * units) random merge windows of every image (at least one kept).

    A reference for the data side, which decides the drop before it writes the image-pad tokens.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"token drop rate must be within [0, 1), got {drop_rate}")
    masks = []
    for size in units_per_image(grid_thw, merge):
        keep = torch.ones(size, dtype=torch.bool)
        dropped = min(round(drop_rate * size), size - 1)
        keep[torch.randperm(size, generator=generator)[:dropped]] = False
        masks.append(keep)
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
