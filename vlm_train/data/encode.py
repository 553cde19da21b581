"""Encode a Sample: chat template, tokens, labels shifted within the sample, M-RoPE positions, image patches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample
from vlm_train.data.image import PatchSpec, image_to_patches
from vlm_train.data.tokenizer import special_ids


@dataclass
class EncodedSample:
    """One sample ready to pack; arrays are numpy so loader workers stay light."""

    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L]
    position_ids: np.ndarray  # int64 [3, L]
    pixel_values: np.ndarray  # float32 [P, patch_dim]
    image_grid_thw: np.ndarray  # int64 [N, 3]
    meta: dict[str, Any] = field(default_factory=dict)

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
        self.positions: list[np.ndarray] = []
        self.next_position = 0

    def text(self, ids: list[int], supervised: bool = False) -> None:
        n = len(ids)
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.supervised.append(np.full(n, supervised))
        self.positions.append(np.broadcast_to(np.arange(self.next_position, self.next_position + n), (3, n)))
        self.next_position += n

    def image(self, image_pad_id: int, grid_thw: tuple[int, int, int], merge_size: int) -> None:
        # Qwen2-VL rope index: an image's tokens take (t, row, column) positions offset by the text before it.
        t, h, w = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
        n = t * h * w
        grid = np.stack(
            [
                np.repeat(np.arange(t), h * w),
                np.tile(np.repeat(np.arange(h), w), t),
                np.tile(np.arange(w), t * h),
            ]
        )
        self.ids.append(np.full(n, image_pad_id, dtype=np.int64))
        self.supervised.append(np.zeros(n, dtype=bool))
        self.positions.append(grid + self.next_position)
        self.next_position += int(grid.max()) + 1

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.concatenate(self.ids)
        supervised = np.concatenate(self.supervised)
        labels = np.full_like(ids, IGNORE_INDEX)
        # Shift inside the sample: position i learns token i+1, and the last token predicts nothing.
        labels[:-1] = np.where(supervised[1:], ids[1:], IGNORE_INDEX)
        return ids, labels, np.concatenate(self.positions, axis=1).astype(np.int64)


class Encoder:
    """Qwen2-VL chat template: <|im_start|>role\\n ... <|im_end|>\\n, images as vision_start, pads, vision_end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: PatchSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        self.special = special_ids(tokenizer)
        self._role_header = {role: self._tokens(f"{role}\n") for role in ("user", "assistant")}
        self._newline = self._tokens("\n")

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode(self, sample: Sample, for_generation: bool = False) -> EncodedSample:
        """Encode a sample; with `for_generation` the last assistant turn is left for the model to write."""
        turns = sample.turns[:-1] if for_generation else sample.turns
        if for_generation and (not sample.turns or sample.turns[-1].role != "assistant"):
            raise ValueError(f"sample {sample.key}: generation needs a final assistant turn to hold out")
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in sample.turns)
        if placeholders != len(sample.images):
            raise SkipSample("image_count_mismatch", f"{placeholders} placeholders, {len(sample.images)} images")

        patches, grids = [], []
        for image in sample.images:
            pixel_values, grid = image_to_patches(image, self.spec)
            patches.append(pixel_values)
            grids.append(grid)

        builder = _Builder()
        images = iter(grids)
        for turn in turns:
            builder.text([self.special.im_start] + self._role_header[turn.role])
            if turn.role == "assistant":
                builder.text(self._tokens(turn.text) + [self.special.im_end], supervised=True)
            else:
                for index, chunk in enumerate(turn.text.split(IMAGE_PLACEHOLDER)):
                    if index > 0:
                        builder.text([self.special.vision_start])
                        builder.image(self.special.image_pad, next(images), self.spec.merge_size)
                        builder.text([self.special.vision_end])
                    if chunk:
                        builder.text(self._tokens(chunk))
                builder.text([self.special.im_end])
            builder.text(self._newline)
        if for_generation:
            builder.text([self.special.im_start] + self._role_header["assistant"])
        ids, labels, positions = builder.finish()

        meta = {"key": sample.key, "source": sample.source, "task": sample.task, **sample.meta}
        return EncodedSample(
            input_ids=ids,
            labels=labels,
            position_ids=positions,
            pixel_values=np.concatenate(patches) if patches else np.zeros((0, self.spec.patch_dim), np.float32),
            image_grid_thw=np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            meta=meta,
        )
