"""A sample whose videos put it over the pack budgets is thinned to fit rather than dropped.

Frames go first (an even number kept, evenly spaced in time, down to 2), then the frames shrink (sides in smaller
multiples of patch_size * merge_size). Sizes are counted without token drop (drop only makes a video smaller), so a
thinned sample fits whatever its draws. The sample is encoded again with the same random draws (image scales and
token drops unchanged); `meta["video_thinned"]` records what changed, and the stream counts it as `video_thinned`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import Sample
from vlm_train.data.image import PatchSpec
from vlm_train.data.pack_planner import Budget
from vlm_train.data.video import Video, resize_frame

THINNED = "video_thinned"  # the meta key and the counter's reason


def video_patches(frames: int, height: int, width: int, spec: PatchSpec) -> int:
    """ViT patches of `frames` frames of height x width (frames padded to whole temporal patches, as patchified)."""
    t = spec.temporal_patch_size
    return math.ceil(frames / t) * (height // spec.patch_size) * (width // spec.patch_size)


def keep_frames(video: Video, count: int) -> Video:
    """`count` of the video's frames, evenly spaced over its span; sample_fps scales with the share kept (it is
    frames per second of video, as in sample_plan), so second_per_grid_t and the time positions stay true to time."""
    total = video.frames.shape[0]
    if count >= total:
        return video
    chosen = np.linspace(0, total - 1, count).round().astype(np.int64)
    return Video(
        video.frames[chosen], video.sample_fps * count / total, [float(video.timestamps[i]) for i in chosen.tolist()]
    )


def thin_video(video: Video, max_patches: int, spec: PatchSpec) -> Video | None:
    """The video with the fewest frames dropped, then the least shrinking, that has at most `max_patches` patches;
    None when even 2 frames of one merge window each are too many."""
    total, height, width = video.frames.shape[:3]
    t, factor = spec.temporal_patch_size, spec.factor
    if video_patches(total, height, width, spec) <= max_patches:
        return video
    per_patch = (height // spec.patch_size) * (width // spec.patch_size)  # patches of one temporal patch
    count = max(2, min(total, (max_patches // per_patch) * t) // 2 * 2)  # even, and whole temporal patches
    video = keep_frames(video, count)
    if video_patches(count, height, width, spec) <= max_patches:
        return video
    # Shrink both sides by the same ratio (aspect kept as well as the factor allows), then step down until it fits.
    temporal = math.ceil(count / t)
    area = max_patches // temporal * spec.patch_size**2  # pixels one frame may have
    if area < factor * factor:
        return None
    beta = math.sqrt(height * width / area)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
    while video_patches(count, h, w, spec) > max_patches:
        if h >= w and h > factor:
            h -= factor
        elif w > factor:
            w -= factor
        else:
            return None
    frames = np.stack([resize_frame(frame, h, w) for frame in video.frames])
    return Video(frames, video.sample_fps, list(video.timestamps))


def encode_to_fit(
    encoder: Encoder, sample: Sample, budget: Budget, rng: np.random.Generator | None = None
) -> EncodedSample:
    """Encode the sample; if it has videos and is over the token or patch budget, thin its videos to fit and encode
    again. What cannot fit (the text alone is too long, too many images) is left to the packer's too_long policy."""
    state = rng.bit_generator.state if rng is not None else None
    encoded = encoder.encode(sample, rng=rng)
    over = budget.overflow(encoded.num_tokens, encoded.num_patches, encoded.image_grid_thw.shape[0])
    if not sample.videos or over not in ("tokens", "patches"):
        return encoded
    unit = encoder.spec.merge_size**2
    tokens = encoded.meta["video_tokens"]
    other_tokens = encoded.num_tokens - sum(tokens)
    other_patches = encoded.num_patches - sum(tokens) * unit  # a kept pad token stands for one merge window
    # The videos' share of both budgets, in patches (one pad token per merge window).
    allowance = min(budget.patches - other_patches, (budget.tokens - other_tokens) * unit)
    full = [video_patches(v.frames.shape[0], v.frames.shape[1], v.frames.shape[2], encoder.spec) for v in sample.videos]
    if allowance <= 0:
        return encoded
    thinned = []
    for video, size in zip(sample.videos, full):
        share = allowance * size // sum(full) // unit * unit  # proportional, in whole merge windows
        fitted = thin_video(video, share, encoder.spec)
        if fitted is None:
            return encoded
        thinned.append(fitted)
    if state is not None:
        rng.bit_generator.state = state  # the same draws as the first encoding: only the videos change
    refit = encoder.encode(dataclasses.replace(sample, videos=thinned), rng=rng)
    refit.meta[THINNED] = [
        {
            "frames": [a.frames.shape[0], b.frames.shape[0]],
            "size": [list(a.frames.shape[1:3]), list(b.frames.shape[1:3])],
        }
        for a, b in zip(sample.videos, thinned)
    ]
    return refit
