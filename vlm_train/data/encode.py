"""Encode a Sample: chat template, tokens, labels shifted within the sample, M-RoPE positions, image patches."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample
from vlm_train.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import (
    ImageSampling,
    PatchSpec,
    image_to_patches,
    kept_windows,
    scaled_size,
    window_positions,
)
from vlm_train.data.tokenizer import special_ids
from vlm_train.data.video_patches import expand_frames, temporal_positions, video_to_patches

if TYPE_CHECKING:
    from vlm_train.data.video import Video

# A user turn's text splits into text chunks and the placeholders between them (kept by the capture group).
TOKEN_CACHE_SIZE = 1 << 16  # texts whose ids an Encoder keeps
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


@dataclass
class EncodedSample:
    """One sample ready to pack; arrays are numpy so loader workers stay light."""

    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L]
    position_ids: np.ndarray  # int64 [3, L]
    # uint8 [P, 3*p*p]: raw pixels of one frame per patch (see batch.PackedBatch); [P, 3*t*p*p] (all t frames,
    # images' frame repeated) when the sample has a video
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray  # int64 [N, 3]: images and videos in placeholder order
    meta: dict[str, Any] = field(default_factory=dict)
    patch_positions: np.ndarray | None = None  # int64 [P, 2] (row, column) of each patch; set when tokens drop
    # A target's stored hidden states per token (format hidden_states, offline draft training); torch tensors,
    # as numpy has no bfloat16
    target_aux: torch.Tensor | None = None  # [L, 3D]
    target_final: torch.Tensor | None = None  # [L, D]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


class _Builder:
    """Accumulates token runs with their supervision flags and M-RoPE positions."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.supervised: list[np.ndarray] = []
        # A text run's positions are one count for all three M-RoPE rows: (start, length), laid out in finish();
        # a vision run's are its own [3, n] grid.
        self.positions: list[tuple[int, int] | np.ndarray] = []
        self.next_position = 0

    def text(self, ids: list[int], supervised: bool = False) -> None:
        n = len(ids)
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.supervised.append(np.full(n, supervised))
        self.positions.append((self.next_position, n))
        self.next_position += n

    def image(
        self, image_pad_id: int, grid_thw: tuple[int, int, int], merge_size: int, keep: np.ndarray | None
    ) -> None:
        # Qwen2-VL rope index: an image's tokens take (t, row, column) positions offset by the text before it.
        self._vision(image_pad_id, np.arange(grid_thw[0]), grid_thw, merge_size, keep)

    def video(
        self,
        pad_id: int,
        grid_thw: tuple[int, int, int],
        merge_size: int,
        second_per_grid_t: float,
        tokens_per_second: float,
        keep: np.ndarray | None = None,
    ) -> None:
        # Qwen2.5-VL: temporal patch k sits at int(k * second_per_grid_t * tokens_per_second), rows and columns as
        # for images; the text after continues from the largest position + 1, as Qwen2.5-VL was trained (and
        # transformers < 5.3 and vLLM compute; transformers >= 5.3 restarts it after the spatial extent only).
        times = temporal_positions(grid_thw[0], second_per_grid_t, tokens_per_second)
        self._vision(pad_id, times, grid_thw, merge_size, keep)

    def _vision(
        self, pad_id: int, times: np.ndarray, grid_thw: tuple, merge_size: int, keep: np.ndarray | None
    ) -> None:
        t, h, w = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
        grid = np.stack(
            [
                np.repeat(times, h * w),
                np.tile(np.repeat(np.arange(h), w), t),
                np.tile(np.arange(w), t * h),
            ]
        )
        span = int(grid.max()) + 1  # a dropped image still spans its full extent, so the text after it is unmoved
        if keep is not None:
            grid = grid[:, keep]  # dropped merge windows have no token; the kept ones keep their place
        n = grid.shape[1]
        self.ids.append(np.full(n, pad_id, dtype=np.int64))
        self.supervised.append(np.zeros(n, dtype=bool))
        self.positions.append(grid + self.next_position)
        self.next_position += span

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.concatenate(self.ids)
        supervised = np.concatenate(self.supervised)
        labels = np.full_like(ids, IGNORE_INDEX)
        # Shift inside the sample: position i learns token i+1, and the last token predicts nothing.
        labels[:-1] = np.where(supervised[1:], ids[1:], IGNORE_INDEX)
        positions = np.empty((3, ids.shape[0]), dtype=np.int64)
        column = 0
        for run in self.positions:
            if isinstance(run, tuple):  # text: the same count on every row
                start, n = run
                positions[:, column : column + n] = np.arange(start, start + n)
            else:
                n = run.shape[1]
                positions[:, column : column + n] = run
            column += n
        return ids, labels, positions


def _concat_patches(patches: list[np.ndarray], pixel_dim: int) -> np.ndarray:
    if len(patches) == 1:
        return patches[0]  # no copy of the common one-image case
    return np.concatenate(patches) if patches else np.zeros((0, pixel_dim), np.uint8)


def _concat_positions(positions: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(positions) if positions else np.zeros((0, 2), np.int64)


class Encoder:
    """Qwen2-VL chat template: <|im_start|>role\\n ... <|im_end|>\\n, images and videos as vision_start, pads,
    vision_end (videos with Qwen2.5-VL's time positions).

    Loss falls on assistant turns (with their <|im_end|>) and on plain-text documents (with <|endoftext|>).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        spec: PatchSpec,
        sampling: ImageSampling | None = None,
        system_prompt: str = "",
    ):
        self.tokenizer = tokenizer
        self.spec = spec
        self.sampling = sampling or ImageSampling()
        self.system_prompt = system_prompt
        self.special = special_ids(tokenizer)
        self._token_cache: dict[str, list[int]] = {}
        self._role_header = {role: self._tokens(f"{role}\n") for role in ("system", "user", "assistant")}
        self._newline = self._tokens("\n")

    def _tokens(self, text: str) -> list[int]:
        """The ids of `text` (never mutated by callers). Prompts, system prompts and short answers repeat across
        samples, so they are tokenized once; the cache is dropped when it holds TOKEN_CACHE_SIZE texts."""
        ids = self._token_cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            self._token_cache[text] = ids
        return ids

    def _image(self, image, rng: np.random.Generator | None) -> tuple[np.ndarray, tuple, np.ndarray | None]:
        """Patches, grid and kept merge windows (None: all) of one image, with this sample's random draws."""
        try:
            size = scaled_size(image.height, image.width, self.spec, self.sampling.scale(rng))
        except ValueError as exc:  # an extreme aspect ratio or an empty side
            raise SkipSample("bad_image_size", str(exc)) from exc
        pixel_values, grid = image_to_patches(image, self.spec, size)
        rate = self.sampling.drop_rate(rng)
        if not self.sampling.drops:
            return pixel_values, grid, None
        windows = pixel_values.shape[0] // self.spec.merge_size**2
        keep = kept_windows(windows, rate, rng) if rate > 0 else np.arange(windows)
        return pixel_values, grid, keep

    def _video(self, video: Video, rng: np.random.Generator | None) -> tuple:
        """Patches (all t frames per row), grid, seconds per temporal patch, kept merge windows (None: all) and the
        kept patches' positions of one video's sampled frames."""
        if not video.sample_fps > 0:
            raise SkipSample("bad_video", f"sample_fps must be > 0, got {video.sample_fps}")
        try:
            pixel_values, grid = video_to_patches(video, self.spec)
        except ValueError as exc:  # frames not resized to the merge multiple, or not uint8 [T, H, W, 3]
            raise SkipSample("bad_video_size", str(exc)) from exc
        second_per_grid_t = video.second_per_grid_t(self.spec.temporal_patch_size)
        if not self.sampling.drops:
            return pixel_values, grid, second_per_grid_t, None, None
        # Token drop as for an image, over the t*h*w merge windows; a video's patch positions stack its temporal
        # patches' rows (row + k*h), so they name the window's time as well as its place (vision_layout reads them).
        rate = self.sampling.drop_rate(rng)
        windows = pixel_values.shape[0] // self.spec.merge_size**2
        keep = kept_windows(windows, rate, rng) if rate > 0 else np.arange(windows)
        rows = (keep[:, None] * self.spec.merge_size**2 + np.arange(self.spec.merge_size**2)).reshape(-1)
        positions = window_positions((1, grid[0] * grid[1], grid[2]), self.spec.merge_size)[rows]
        return pixel_values[rows], grid, second_per_grid_t, keep, positions

    def encode(
        self, sample: Sample, for_generation: bool = False, rng: np.random.Generator | None = None
    ) -> EncodedSample:
        """Encode a sample; with `for_generation` the last assistant turn is left for the model to write.
        `rng` draws the per-image resolution scale and token drop (none without it); videos come already resized."""
        turns = sample.turns[:-1] if for_generation else sample.turns
        if self.system_prompt and turns and turns[0].role not in ("system", "text"):
            turns = [Turn("system", self.system_prompt), *turns]
        if for_generation and (not sample.turns or sample.turns[-1].role != "assistant"):
            raise ValueError(f"sample {sample.key}: generation needs a final assistant turn to hold out")
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in sample.turns)
        if placeholders != len(sample.images):
            raise SkipSample("image_count_mismatch", f"{placeholders} placeholders, {len(sample.images)} images")
        video_placeholders = sum(turn.text.count(VIDEO_PLACEHOLDER) for turn in sample.turns)
        if video_placeholders != len(sample.videos):
            raise SkipSample(
                "video_count_mismatch",
                f"{video_placeholders} {VIDEO_PLACEHOLDER} placeholders, {len(sample.videos)} videos",
            )

        merge = self.spec.merge_size
        images = []  # (patches, grid, keep, patch positions) per image, drawn in image order
        for image in sample.images:
            pixel_values, grid, keep = self._image(image, rng)
            positions = None
            if keep is not None:
                rows = (keep[:, None] * merge**2 + np.arange(merge**2)).reshape(-1)
                pixel_values = pixel_values[rows]
                positions = window_positions(grid, merge)[rows]
            images.append((pixel_values, grid, keep, positions))
        videos = [self._video(video, rng) for video in sample.videos]

        builder = _Builder()
        image_items, video_items = iter(images), iter(videos)
        patches, grids, patch_positions = [], [], []  # images and videos in placeholder order
        video_tokens = []  # pad tokens of each video, for video_thinning to size what the rest of the sample takes

        def media_and_text(text: str, supervised: bool) -> None:
            """A turn's text with its images and videos in place; `supervised` marks the text (never the media)."""
            for part in _PLACEHOLDERS.split(text):
                if part == IMAGE_PLACEHOLDER:
                    pixel_values, grid, keep, positions = next(image_items)
                    builder.text([self.special.vision_start])
                    builder.image(self.special.image_pad, grid, merge, keep)
                    builder.text([self.special.vision_end])
                    patches.append(pixel_values)
                    grids.append(grid)
                    patch_positions.append(positions)
                elif part == VIDEO_PLACEHOLDER:
                    # Video tokens are image pads too: the model fills every pad with the next vision
                    # embedding in grid order, and the positions (the only place time enters) are set here.
                    pixel_values, grid, second_per_grid_t, keep, positions = next(video_items)
                    builder.text([self.special.vision_start])
                    builder.video(
                        self.special.image_pad, grid, merge, second_per_grid_t, self.spec.tokens_per_second, keep
                    )
                    builder.text([self.special.vision_end])
                    patches.append(pixel_values)
                    grids.append(grid)
                    patch_positions.append(positions)
                    video_tokens.append(pixel_values.shape[0] // merge**2)
                elif part:
                    builder.text(self._tokens(part), supervised=supervised)

        for turn in turns:
            if turn.role == "text":
                # A plain document (interleaved ones hold images): loss on its text and its end, not on images.
                if IMAGE_PLACEHOLDER in turn.text or VIDEO_PLACEHOLDER in turn.text:
                    media_and_text(turn.text, supervised=True)
                    builder.text([self.special.pad], supervised=True)
                else:
                    builder.text(self._tokens(turn.text) + [self.special.pad], supervised=True)
                continue
            if turn.role not in self._role_header:
                raise ValueError(f"sample {sample.key}: unknown turn role {turn.role!r}")
            builder.text([self.special.im_start] + self._role_header[turn.role])
            if turn.role == "assistant":
                builder.text(self._tokens(turn.text) + [self.special.im_end], supervised=True)
            else:
                media_and_text(turn.text, supervised=False)
                builder.text([self.special.im_end])
            builder.text(self._newline)
        if next(image_items, None) is not None or next(video_items, None) is not None:
            raise SkipSample("bad_conversation", "an image or video placeholder outside a user, system or text turn")
        if for_generation:
            builder.text([self.special.im_start] + self._role_header["assistant"])
        if videos:  # one row width per sample: images' one-frame rows repeated over t, as the model would
            patches = [
                p if p.shape[1] == self.spec.patch_dim else expand_frames(p, self.spec.temporal_patch_size)
                for p in patches
            ]
        ids, labels, positions = builder.finish()

        meta = {**sample.meta, "key": sample.key, "source": sample.source, "task": sample.task}
        if video_tokens:
            meta["video_tokens"] = video_tokens
        return EncodedSample(
            input_ids=ids,
            labels=labels,
            position_ids=positions,
            pixel_values=_concat_patches(patches, self.spec.pixel_dim),
            image_grid_thw=np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            meta=meta,
            patch_positions=_concat_positions([p for p in patch_positions if p is not None])
            if self.sampling.drops
            else None,
        )
