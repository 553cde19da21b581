"""Sequence packer: encoded samples into packs under an LLM-token, a ViT-patch and an image budget, then collated."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample
from vlm_train.data.packing import SKIP_REASONS, Budget, Item, StreamPacker
from vlm_train.data.tokenizer import SpecialIds
from vlm_train.data.truncate import patches_per_image, truncate

TOO_LONG_POLICIES = ("drop", "truncate")


@dataclass
class PackConfig:
    llm_budget: int = 1024  # LLM tokens per pack
    vit_budget: int = 4096  # ViT patches per pack
    max_images: int = 0  # images per pack; 0: no limit
    buffer_size: int = 64  # samples held while choosing packs (more while they hold under two packs of tokens)
    too_long: str = "drop"  # a sample over a budget: drop (counted) | truncate (text cut at the end, images whole)

    def budget(self) -> Budget:
        if self.too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"data.pack.too_long must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}")
        if self.buffer_size <= 0:
            raise ValueError(f"data.pack.buffer_size must be positive, got {self.buffer_size}")
        try:
            return Budget(self.llm_budget, self.vit_budget, self.max_images)
        except ValueError as exc:
            raise ValueError(f"data.pack: {exc} (llm_budget, vit_budget > 0; max_images >= 0)") from exc


def restore_key(sample: EncodedSample) -> dict[str, Any]:
    """What the loader needs to read a sample again: its `restore_key` meta, else its source and key."""
    meta = sample.meta
    return meta["restore_key"] if "restore_key" in meta else {"source": meta.get("source"), "key": meta.get("key")}


class Packer:
    """Streams encoded samples into packs (see packing.StreamPacker); its state is the buffer's restore keys.

    `special` (the encoder's token ids) is needed by the `truncate` policy, to keep images whole.
    """

    def __init__(self, cfg: PackConfig, special: SpecialIds | None = None):
        self.cfg = cfg
        self.budget = cfg.budget()
        if cfg.too_long == "truncate" and special is None:
            raise ValueError("data.pack.too_long=truncate: build the Packer with special=encoder.special")
        self.special = special
        self.packer = StreamPacker(self.budget, cfg.buffer_size)
        self.counts: Counter = Counter()  # dropped/<reason>, truncated

    @property
    def buffer(self) -> list[EncodedSample]:
        """Buffered samples, oldest first."""
        return [item.payload for item in self.packer.items()]

    def check(self, sample: EncodedSample) -> EncodedSample:
        """The sample as it will be packed: itself, truncated, or SkipSample when no pack could hold it."""
        over = self.budget.overflow(sample.num_tokens, sample.num_patches, sample.image_grid_thw.shape[0])
        if over is None:
            return sample
        if self.cfg.too_long == "truncate" and (cut := truncate(sample, self.budget, self.special)) is not None:
            return cut
        limit = {"tokens": self.budget.tokens, "patches": self.budget.patches, "images": self.budget.images}[over]
        raise SkipSample(SKIP_REASONS[over], f"sample {sample.meta.get('key')} is over the {over} budget {limit}")

    def add(self, sample: EncodedSample) -> list[list[EncodedSample]]:
        """Buffer a sample; returns the packs it completes (none while the buffer fills). Raises SkipSample."""
        try:
            packed = self.check(sample)
        except SkipSample as exc:
            self.counts[f"dropped/{exc.reason}"] += 1
            raise
        if packed is not sample:
            self.counts["truncated"] += 1
        return [[item.payload for item in pack] for pack in self.packer.push(_item(packed))]

    def flush(self) -> list[list[EncodedSample]]:
        """Pack everything still buffered (end of stream)."""
        return [[item.payload for item in pack] for pack in self.packer.flush()]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the buffered samples' restore keys (oldest first), the stream totals and the counts."""
        return {
            "buffer": [restore_key(s) for s in self.buffer],
            "seen_tokens": self.packer.seen_tokens,
            "seen_patches": self.packer.seen_patches,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any], resolve: Callable[[dict[str, Any]], EncodedSample]) -> None:
        """Rebuild the buffer: `resolve(key)` re-encodes the sample of each saved restore key."""
        self.packer = StreamPacker(self.budget, self.cfg.buffer_size)
        items = []
        for key in state["buffer"]:
            try:
                items.append(_item(self.check(resolve(key))))
            except SkipSample as exc:
                raise ValueError(
                    f"packer state: buffered sample {key} no longer fits the pack budgets ({exc}); "
                    "resume with the data.pack settings it was saved with"
                ) from exc
        self.packer.restore(items, int(state["seen_tokens"]), int(state["seen_patches"]))
        self.counts = Counter(state.get("counts", {}))


def _item(sample: EncodedSample) -> Item:
    return Item(sample.num_tokens, sample.num_patches, int(sample.image_grid_thw.shape[0]), sample)


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


def collate(
    samples: list[EncodedSample], skipped: dict[str, int] | None = None, image_token_id: int | None = None
) -> PackedBatch:
    """Lay samples out flat, one after another, with boundary indices for the LLM and the ViT.

    `image_token_id` is needed only for samples with dropped image tokens, to find each image's kept patches.
    """
    if not samples:
        raise ValueError("cannot collate an empty pack")
    lengths = [s.num_tokens for s in samples]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw.shape[0]]
    grid_thw = torch.from_numpy(np.concatenate(grids)) if grids else torch.zeros((0, 3), dtype=torch.int64)
    # Per image, its patches in pixel_values: the whole grid, or (with token drop) the windows it kept.
    image_lengths = [n for s in samples for n in _patches_per_image(s, image_token_id)]
    pixels = _pixel_values(samples)
    with_positions = [s.patch_positions is not None for s in samples]
    if any(with_positions) and not all(with_positions):
        raise ValueError("cannot collate samples with and without patch_positions (token drop) into one pack")
    positions = np.concatenate([s.patch_positions for s in samples]) if all(with_positions) else None
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples])),
        labels=torch.from_numpy(np.concatenate([s.labels for s in samples])),
        position_ids=torch.from_numpy(np.concatenate([s.position_ids for s in samples], axis=1)),
        cu_seqlens=_cu_seqlens(lengths),
        max_seqlen=max(lengths),
        sample_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths)),
        pixel_values=pixels,
        image_grid_thw=grid_thw,
        vit_cu_seqlens=_cu_seqlens(image_lengths),
        vit_max_seqlen=max(image_lengths, default=0),
        meta=[s.meta for s in samples],
        skipped=dict(skipped or {}),
        patch_positions=None if positions is None else torch.from_numpy(positions),
    )


def _pixel_values(samples: list[EncodedSample]) -> torch.Tensor:
    """The samples' patches one after another, in their own dtype and width (uint8 [P, C*p*p] from the encoder)."""
    arrays = [s.pixel_values for s in samples if s.pixel_values.shape[0]] or [samples[0].pixel_values]
    layouts = {(str(a.dtype), a.shape[1]) for a in arrays}
    if len(layouts) > 1:  # np.concatenate would silently upcast uint8 pixels to float
        raise ValueError(f"cannot collate samples whose pixel_values differ in dtype or width: {sorted(layouts)}")
    return torch.from_numpy(np.concatenate(arrays))


def _patches_per_image(sample: EncodedSample, image_token_id: int | None) -> list[int]:
    full = sample.image_grid_thw.prod(axis=1).tolist()
    if sum(full) == sample.num_patches:
        return full
    if image_token_id is None:
        raise ValueError(f"sample {sample.meta.get('key')} dropped image tokens: collate it with image_token_id")
    return patches_per_image(sample, image_token_id)
