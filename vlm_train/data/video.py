"""Videos as samples carry them: frames sampled from a clip (or a folder of numbered frames), resized, with the
timing the model's temporal positions need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Video:
    """Sampled frames of one video, uint8 [T, H, W, 3] (T even for the temporal patch of 2; H and W multiples of
    patch_size * merge_size after resizing), the rate they were sampled at (frames per second), and when each frame
    is in the source (seconds)."""

    frames: np.ndarray
    sample_fps: float
    timestamps: list[float]

    def second_per_grid_t(self, temporal_patch_size: int) -> float:
        """Seconds per temporal patch (Qwen2.5-VL's second_per_grid_ts): temporal_patch_size / sample_fps."""
        return temporal_patch_size / self.sample_fps
