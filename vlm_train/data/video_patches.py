"""Videos to patches, Qwen2-VL style: t frames per patch, rows (C, t, p, p) in merge order, and their time positions.

Rows leave the loader as raw uint8 pixels like image patches, but with all t frames of the temporal patch; a pack
that holds a video widens its one-frame image rows to match (`expand_frames`), which is what the model's patch
embedding does with one-frame rows anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlm_train.data.image import PatchSpec

if TYPE_CHECKING:  # only the frames and rate are read; decoding (PyAV) is not needed here
    from vlm_train.data.video import Video


def video_to_patches(video: Video, spec: PatchSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames uint8 [T, H, W, 3] (already resized) -> (uint8 [P, 3*t*p*p] in merge order, (T/t, H/p, W/p) grid).

    Row order and layout are those of transformers' Qwen2VLVideoProcessor.patchify; like it, a frame count that is
    not a multiple of t is padded by repeating the last frame.
    """
    frames = np.asarray(video.frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"video frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    num_frames, height, width = frames.shape[:3]
    if height % spec.factor or width % spec.factor:
        raise ValueError(f"video frames of {width}x{height} are not multiples of {spec.factor}: resize them first")
    if pad := -num_frames % t:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    grid_t, grid_h, grid_w = frames.shape[0] // t, height // p, width // p
    # (gt, t, gh/m, m, p, gw/m, m, p, C) -> (gt, gh/m, gw/m, m, m, C, t, p, p): HF's permute(0,1,4,7,5,8,3,2,6,9).
    windows = frames.reshape(grid_t, t, grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = np.ascontiguousarray(windows).reshape(grid_t * grid_h * grid_w, 3 * t * p * p)
    return rows, (grid_t, grid_h, grid_w)


def expand_frames(patches: np.ndarray, temporal_patch_size: int) -> np.ndarray:
    """One-frame uint8 rows [P, 3*p*p] -> [P, 3*t*p*p], the frame repeated over t in (C, t, p, p) layout.

    The model's patch embedding repeats one-frame rows the same way, so a widened image embeds identically.
    """
    n, width = patches.shape
    rows = patches.reshape(n, 3, 1, width // 3)
    return np.ascontiguousarray(np.broadcast_to(rows, (n, 3, temporal_patch_size, width // 3))).reshape(n, -1)


def temporal_positions(grid_t: int, second_per_grid_t: float, tokens_per_second: float) -> np.ndarray:
    """Qwen2.5-VL's M-RoPE time index of each temporal patch k: int(k * second_per_grid_t * tokens_per_second).

    Computed in float32, as transformers does with the float32 second_per_grid_ts its processor returns, so the
    truncation lands on the same integers (e.g. 2 / 1.5 s per patch at 2 tokens a second: 0, 2, 5, 8, ...).
    """
    interval = np.float32(tokens_per_second) * np.float32(second_per_grid_t)
    return (np.arange(grid_t, dtype=np.float32) * interval).astype(np.int64)
