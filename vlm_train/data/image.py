"""Images to patches, Qwen2-VL style: keep the aspect ratio, round to the merge multiple, flatten in merge order."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# CLIP's normalisation, which Qwen2-VL's image processor uses.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class PatchSpec:
    """Patch geometry, taken from the vision tower's config so data and model cannot disagree."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2


def smart_resize(height: int, width: int, spec: PatchSpec) -> tuple[int, int]:
    """Nearest size with both sides multiples of the merge factor and area within [min_pixels, max_pixels]."""
    factor = spec.factor
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > spec.max_pixels:
        beta = math.sqrt(height * width / spec.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def image_to_patches(image: Image.Image, spec: PatchSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize, normalise and patchify one RGB image; returns ([P, patch_dim] float32, (t, h, w) patch grid)."""
    height, width = smart_resize(image.height, image.width, spec)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BICUBIC)
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD  # [H, W, C]
    frames = np.broadcast_to(pixels.transpose(2, 0, 1)[None], (spec.temporal_patch_size, 3, height, width))
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    # (t, C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, t, p, p): each 2x2 merge window is contiguous.
    patches = frames.reshape(t, 3, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, spec.patch_dim)), (1, grid_h, grid_w)
