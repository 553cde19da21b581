"""Images to patches, Qwen2-VL style: keep the aspect ratio, round to the merge multiple, flatten in merge order.

Patches leave the loader as raw uint8 pixels of one frame; the model normalises them and repeats the frame
over the temporal patch on its device (see `normalise_patches` for the float values it computes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# CLIP's normalisation, which Qwen2-VL's image processor uses (after rescaling by 1/255).
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# (x / 255 - mean) / std as one multiply and one add per channel, in float32; the model uses these same numbers.
PIXEL_SCALE = (1.0 / (255.0 * IMAGE_STD)).astype(np.float32)
PIXEL_SHIFT = (-IMAGE_MEAN / IMAGE_STD).astype(np.float32)

# "pil": PIL bicubic, pixel for pixel what HF's Qwen2VLImageProcessorPil makes.
# "torch": torch's antialiased bicubic on uint8 (SIMD kernels), ~2.5x faster; off by 1 from PIL on a few % of values,
# by more on ~1e-5 of them.
RESIZE_METHODS = ("pil", "torch")


@dataclass(frozen=True)
class PatchSpec:
    """Patch geometry, taken from the vision tower's config so data and model cannot disagree; pixel range; resize."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resize: str = "pil"  # one of RESIZE_METHODS
    tokens_per_second: int = 2  # Qwen2.5-VL's M-RoPE time steps per second of video (vision_config.tokens_per_second)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"image resize method must be one of {RESIZE_METHODS}, got {self.resize!r}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def pixel_dim(self) -> int:
        """Values in one patch as the loader carries it: 3 * p * p uint8 (one frame)."""
        return 3 * self.patch_size**2

    @property
    def patch_dim(self) -> int:
        """Values in one patch as the model embeds it: 3 * t * p * p float (the frame repeated t times)."""
        return 3 * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class ImageSampling:
    """Per-image randomness, NaViT style: a resolution scale, and token dropping for a share of the images."""

    scale_min: float = 1.0  # image sides scaled by a factor drawn uniformly from [scale_min, scale_max]
    scale_max: float = 1.0
    drop_prob: float = 0.0  # share of images that drop merge windows; the rest are seen whole
    drop_rate_min: float = 0.0  # a dropping image's rate is drawn uniformly from [drop_rate_min, drop_rate_max]
    drop_rate_max: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"image scale range must satisfy 0 < min <= max, got [{self.scale_min}, {self.scale_max}]")
        if not 0 <= self.drop_prob <= 1 or not 0 <= self.drop_rate_min <= self.drop_rate_max < 1:
            raise ValueError(f"token drop needs 0 <= prob <= 1 and 0 <= rate_min <= rate_max < 1, got {self}")

    @property
    def scales(self) -> bool:
        return not self.scale_min == self.scale_max == 1.0

    @property
    def drops(self) -> bool:
        return self.drop_prob > 0 and self.drop_rate_max > 0

    @property
    def draws(self) -> bool:
        """Whether an image's encoding draws random numbers (else no generator need be made for it)."""
        return self.scales or self.drops

    def scale(self, rng: np.random.Generator | None) -> float:
        return 1.0 if rng is None or not self.scales else float(rng.uniform(self.scale_min, self.scale_max))

    def drop_rate(self, rng: np.random.Generator | None) -> float:
        if rng is None or not self.drops or rng.random() >= self.drop_prob:
            return 0.0
        return float(rng.uniform(self.drop_rate_min, self.drop_rate_max))


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


def scaled_size(height: int, width: int, spec: PatchSpec, scale: float) -> tuple[int, int]:
    """The smart_resize size with its sides scaled by `scale`, then rounded and bounded again."""
    h, w = smart_resize(height, width, spec)
    if scale == 1.0:
        return h, w
    return smart_resize(max(1, round(h * scale)), max(1, round(w * scale)), spec)


def resize_image(image: Image.Image, height: int, width: int, method: str = "pil") -> np.ndarray:
    """The RGB image resized (bicubic) to height x width: uint8 [height, width, 3] (a view, rows padded to 4 bytes)."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"image resize method must be one of {RESIZE_METHODS}, got {method!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if (width, height) == image.size:
        return _rgbx(image)[..., :3]
    if method == "pil":
        return _rgbx(image.resize((width, height), Image.BICUBIC))[..., :3]
    with warnings.catch_warnings():  # the buffer is read-only, and interpolate only reads it
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(_rgbx(image))
    # NHWC (channels_last) uint8 with 4 channels is the layout torch's vectorised antialias kernels work in.
    resized = F.interpolate(pixels.permute(2, 0, 1).unsqueeze(0), size=(height, width), mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()[..., :3]


def _rgbx(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 4] of an RGB image, copied as PIL stores it: 4 bytes a pixel (packing to 3 bytes costs more)."""
    return np.frombuffer(image.tobytes("raw", "RGBX"), np.uint8).reshape(image.height, image.width, 4)


def patchify(pixels: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [P, 3*p*p] in merge order, each row (C, p, p) like HF's with one frame."""
    p, m = spec.patch_size, spec.merge_size
    grid_h, grid_w = pixels.shape[0] // p, pixels.shape[1] // p
    # (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): each 2x2 merge window is contiguous.
    windows = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    out = np.empty((grid_h // m, grid_w // m, m, m, 3, p, p), dtype=np.uint8)
    np.copyto(out, windows)
    return out.reshape(grid_h * grid_w, spec.pixel_dim)


def image_to_patches(
    image: Image.Image, spec: PatchSpec, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize (to `size` = (height, width) if given) and patchify one RGB image;
    returns ([P, 3*p*p] uint8 raw pixels, (t, h, w) patch grid)."""
    height, width = size or smart_resize(image.height, image.width, spec)
    if height % spec.factor or width % spec.factor:
        raise ValueError(f"image size {width}x{height} is not a multiple of {spec.factor}")
    pixels = resize_image(image, height, width, spec.resize)
    return patchify(pixels, spec), (1, height // spec.patch_size, width // spec.patch_size)


def normalise_patches(patches: np.ndarray, temporal_patch_size: int) -> np.ndarray:
    """Loader patches uint8 [P, 3*p*p] -> HF's pixel_values float32 [P, 3*t*p*p]: normalised, frame repeated t times.

    The model does the same on its device (vit.float_pixel_values); this is the reference for tests and HF callers.
    """
    n = patches.shape[0]
    values = patches.reshape(n, 3, 1, -1).astype(np.float32)
    values *= PIXEL_SCALE.reshape(1, 3, 1, 1)
    values += PIXEL_SHIFT.reshape(1, 3, 1, 1)
    return np.ascontiguousarray(np.broadcast_to(values, (n, 3, temporal_patch_size, values.shape[-1]))).reshape(n, -1)


def window_positions(grid_thw: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, column) in the patch grid of every patch, in merge order: [P, 2] int64."""
    _, h, w = grid_thw
    m = merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([order(rows), order(cols)], axis=1).astype(np.int64)


def kept_windows(num_windows: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of the merge windows an image keeps when `rate` of them are dropped; at least one stays."""
    keep = max(1, num_windows - int(rate * num_windows))
    return np.sort(rng.choice(num_windows, size=keep, replace=False)) if keep < num_windows else np.arange(num_windows)
