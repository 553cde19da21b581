"""PackedBatch: the contract between the data pipeline and the model (see shared/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One pack: S samples and N images laid out flat, with boundary indices and no padding.

    `pixel_values` from the loader are raw uint8 pixels, one frame per patch: [P, C*p*p], each row (C, p, p);
    8x fewer bytes than float32 with the frame repeated over the temporal patch. The model's patch embedding
    normalises them (CLIP mean/std, as HF's image processor) and repeats the frame t times on its device, which
    gives exactly HF's float pixel_values [P, C*t*p*p] (data.image.normalise_patches); the model takes those too,
    as HF callers pass them. `to()` moves the uint8 pixels unchanged: no cast to float before the model.
    """

    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], shifted within each sample, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # int64 [3, T] (M-RoPE rows t, h, w); restart at 0 for every sample
    cu_seqlens: torch.Tensor  # int32 [S+1]
    max_seqlen: int
    sample_index: torch.Tensor  # int64 [T]: which sample of the pack each token belongs to
    # uint8 [P, C*p*p] (or normalised float [P, C*t*p*p]): all patches, merge order; uint8 [P, C*t*p*p] (all t
    # frames, images' frame repeated) in a pack with a video (data.video_patches)
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # int64 [N, 3]: temporal patches, patch rows, patch columns (images and videos)
    vit_cu_seqlens: torch.Tensor  # int32 [N+1]
    vit_max_seqlen: int
    meta: list[dict[str, Any]] = field(default_factory=list)  # per sample: key, source, task, ...
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped since the previous pack, by reason
    patch_positions: torch.Tensor | None = None  # int64 [P, 2] (row, column) per patch; set only when tokens drop
    loader_state: dict[str, Any] | None = None  # a loader worker's state after this pack (taken off by the loader)
    # A target's stored hidden states (offline Eagle3 draft training; see tools/dump_hidden_states.py), per token:
    target_aux: torch.Tensor | None = None  # [T, 3D]: its three draft layers' outputs, concatenated
    target_final: torch.Tensor | None = None  # [T, D]: its final-normed hidden state (its LM head's input)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor moved to `device`, dtypes unchanged (uint8 pixels stay uint8)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PackedBatch(**moved)
