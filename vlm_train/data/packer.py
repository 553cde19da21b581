"""Sequence packer: best-fit-decreasing over a bounded buffer, under an LLM-token and a ViT-patch budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample


@dataclass
class PackConfig:
    llm_budget: int = 1024  # LLM tokens per pack
    vit_budget: int = 4096  # ViT patches per pack
    buffer_size: int = 64  # samples held while choosing packs


class _Bin:
    def __init__(self) -> None:
        self.items: list[EncodedSample] = []
        self.tokens = 0
        self.patches = 0

    def add(self, sample: EncodedSample) -> None:
        self.items.append(sample)
        self.tokens += sample.num_tokens
        self.patches += sample.num_patches


class Packer:
    """Streams samples into packs: whenever the buffer is full, it releases the fullest pack it can form."""

    def __init__(self, cfg: PackConfig):
        if cfg.llm_budget <= 0 or cfg.vit_budget <= 0 or cfg.buffer_size <= 0:
            raise ValueError(f"pack budgets and buffer must be positive, got {cfg}")
        self.cfg = cfg
        self.buffer: list[EncodedSample] = []

    def check(self, sample: EncodedSample) -> None:
        """Raise SkipSample for a sample that no pack could hold."""
        if sample.num_tokens > self.cfg.llm_budget:
            raise SkipSample("too_long", f"{sample.num_tokens} tokens > llm_budget {self.cfg.llm_budget}")
        if sample.num_patches > self.cfg.vit_budget:
            raise SkipSample("too_many_patches", f"{sample.num_patches} patches > vit_budget {self.cfg.vit_budget}")

    def add(self, sample: EncodedSample) -> list[list[EncodedSample]]:
        """Buffer a sample; returns the packs it completes (none while the buffer fills)."""
        self.check(sample)
        self.buffer.append(sample)
        if len(self.buffer) < self.cfg.buffer_size:
            return []
        return [self._release_fullest()]

    def flush(self) -> list[list[EncodedSample]]:
        """Pack everything still buffered (end of stream)."""
        bins = self._best_fit_decreasing(self.buffer)
        self.buffer = []
        return [b.items for b in bins]

    def _release_fullest(self) -> list[EncodedSample]:
        bins = self._best_fit_decreasing(self.buffer)
        fullest = max(bins, key=lambda b: (b.tokens, b.patches))
        released = {id(s) for s in fullest.items}
        self.buffer = [s for s in self.buffer if id(s) not in released]
        return fullest.items

    def _best_fit_decreasing(self, samples: list[EncodedSample]) -> list[_Bin]:
        bins: list[_Bin] = []
        for sample in sorted(samples, key=lambda s: s.num_tokens, reverse=True):  # stable: ties keep stream order
            best, best_room = None, None
            for b in bins:
                room = self.cfg.llm_budget - b.tokens - sample.num_tokens
                if room >= 0 and b.patches + sample.num_patches <= self.cfg.vit_budget:
                    if best_room is None or room < best_room:
                        best, best_room = b, room
            if best is None:
                best = _Bin()
                bins.append(best)
            best.add(sample)
        return bins


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


def collate(samples: list[EncodedSample], skipped: dict[str, int] | None = None) -> PackedBatch:
    """Lay samples out flat, one after another, with boundary indices for the LLM and the ViT."""
    if not samples:
        raise ValueError("cannot collate an empty pack")
    lengths = [s.num_tokens for s in samples]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw.shape[0]]
    grid_thw = torch.from_numpy(np.concatenate(grids)) if grids else torch.zeros((0, 3), dtype=torch.int64)
    image_lengths = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
    patch_dim = samples[0].pixel_values.shape[1]
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples])),
        labels=torch.from_numpy(np.concatenate([s.labels for s in samples])),
        position_ids=torch.from_numpy(np.concatenate([s.position_ids for s in samples], axis=1)),
        cu_seqlens=_cu_seqlens(lengths),
        max_seqlen=max(lengths),
        sample_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths)),
        pixel_values=torch.from_numpy(np.concatenate([s.pixel_values for s in samples]).reshape(-1, patch_dim)),
        image_grid_thw=grid_thw,
        vit_cu_seqlens=_cu_seqlens(image_lengths),
        vit_max_seqlen=max(image_lengths, default=0),
        meta=[s.meta for s in samples],
        skipped=dict(skipped or {}),
    )
