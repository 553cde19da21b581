"""Lay a pack of encoded samples out flat as a PackedBatch: tokens one after another, boundary indices for the LLM
(cu_seqlens) and the ViT (vit_cu_seqlens), and every image's patches in order."""

from __future__ import annotations

import numpy as np
import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.data.encode import EncodedSample
from vlm_train.data.truncate import patches_per_image
from vlm_train.data.video_patches import expand_frames


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
    target_aux, target_final = _target_states(samples)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples])),
        labels=torch.from_numpy(np.concatenate([s.labels for s in samples])),
        position_ids=torch.from_numpy(np.concatenate([s.position_ids for s in samples], axis=1)),
        cu_seqlens=_cu_seqlens(lengths),
        max_seqlen=max(lengths),
        sample_index=torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64), lengths)),
        pixel_values=pixels,
        image_grid_thw=grid_thw,
        vit_cu_seqlens=_cu_seqlens(image_lengths),
        vit_max_seqlen=max(image_lengths, default=0),
        meta=[s.meta for s in samples],
        skipped=dict(skipped or {}),
        patch_positions=None if positions is None else torch.from_numpy(positions),
        target_aux=target_aux,
        target_final=target_final,
    )


def _target_states(samples: list[EncodedSample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stored target hidden states (offline draft training), per token in pack order: all samples have them or none."""
    stored = [s.target_aux is not None and s.target_final is not None for s in samples]
    if not any(stored):
        return None, None
    if not all(stored):
        raise ValueError("cannot collate samples with and without stored hidden states into one pack")
    layouts = {(s.target_aux.dtype, s.target_aux.shape[1], s.target_final.shape[1]) for s in samples}
    if len(layouts) > 1:  # torch.cat would silently promote bfloat16 and float16 to float32
        raise ValueError(f"cannot collate hidden states of different dtypes or widths: {sorted(map(str, layouts))}")
    return torch.cat([s.target_aux for s in samples]), torch.cat([s.target_final for s in samples])


def _pixel_values(samples: list[EncodedSample]) -> torch.Tensor:
    """The samples' patches one after another, in their own dtype and width (uint8 [P, C*p*p] from the encoder).

    A pack with a video (rows of all t frames, C*t*p*p) widens the one-frame rows of its images to t frames, the
    repeat the model's patch embedding would do; packs without videos keep the t-times smaller one-frame rows.
    """
    arrays = [s.pixel_values for s in samples if s.pixel_values.shape[0]] or [samples[0].pixel_values]
    widths = sorted({a.shape[1] for a in arrays})
    uint8 = all(a.dtype == np.uint8 for a in arrays)
    if uint8 and len(widths) == 2 and widths[1] % widths[0] == 0:
        frames = widths[1] // widths[0]
        arrays = [a if a.shape[1] == widths[1] else expand_frames(a, frames) for a in arrays]
    layouts = {(str(a.dtype), a.shape[1]) for a in arrays}
    if len(layouts) > 1:  # np.concatenate would silently upcast uint8 pixels to float
        raise ValueError(f"cannot collate samples whose pixel_values differ in dtype or width: {sorted(layouts)}")
    return torch.from_numpy(np.concatenate(arrays))


def _patches_per_image(sample: EncodedSample, image_token_id: int | None) -> list[int]:
    if image_token_id is None and int(sample.image_grid_thw.prod(axis=1).sum()) != sample.num_patches:
        raise ValueError(f"sample {sample.meta.get('key')} dropped image tokens: collate it with image_token_id")
    return patches_per_image(sample, -1 if image_token_id is None else image_token_id)
