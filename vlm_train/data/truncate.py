"""Cut an encoded sample to the pack budgets: text at the end goes, an image goes whole or not at all."""

from __future__ import annotations

import dataclasses

import numpy as np

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.encode import EncodedSample
from vlm_train.data.pack_planner import Budget
from vlm_train.data.tokenizer import SpecialIds


def image_runs(input_ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image-pad tokens, one run per image, in order."""
    is_pad = np.concatenate([[False], input_ids == image_token_id, [False]])
    edges = np.flatnonzero(is_pad[1:] != is_pad[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def patches_per_image(sample: EncodedSample, image_token_id: int) -> list[int]:
    """ViT patches of each image in `pixel_values`: its whole grid, or with token drop the windows it kept."""
    full = sample.image_grid_thw.prod(axis=1).tolist()
    if sum(full) == sample.num_patches:
        return full
    runs = image_runs(sample.input_ids, image_token_id)
    tokens = sum(end - start for start, end in runs)
    if len(runs) != len(full) or not tokens or sample.num_patches % tokens:
        raise ValueError(
            f"sample {sample.meta.get('key')}: {len(runs)} image-pad runs ({tokens} tokens) do not "
            f"match {len(full)} images of {sample.num_patches} patches"
        )
    return [(end - start) * (sample.num_patches // tokens) for start, end in runs]


def image_spans(sample: EncodedSample, special: SpecialIds) -> list[tuple[int, int]]:
    """[start, end) token span of each image: its run of image-pad tokens with the vision start/end around it."""
    ids = sample.input_ids
    runs = image_runs(ids, special.image_pad)
    if len(runs) != sample.image_grid_thw.shape[0]:
        raise ValueError(
            f"sample {sample.meta.get('key')}: {len(runs)} image-pad runs but {sample.image_grid_thw.shape[0]} images"
        )
    spans = []
    for start, end in runs:
        start -= int(start > 0 and ids[start - 1] == special.vision_start)
        end += int(end < len(ids) and ids[end] == special.vision_end)
        spans.append((start, end))
    return spans


def truncate(sample: EncodedSample, budget: Budget, special: SpecialIds) -> EncodedSample | None:
    """The longest prefix within all budgets that cuts no image; None when it would keep no supervised token."""
    spans = image_spans(sample, special)
    image_patches = patches_per_image(sample, special.image_pad)
    cut = min(sample.num_tokens, budget.tokens)
    kept_images, kept_patches = 0, 0
    for (start, end), patches in zip(spans, image_patches):
        over_images = budget.images and kept_images + 1 > budget.images
        if end > cut or kept_patches + patches > budget.patches or over_images:
            cut = min(cut, start)  # this image and all after it go; cut just before it
            break
        kept_images += 1
        kept_patches += patches
    labels = sample.labels[:cut].copy()
    if cut:
        labels[-1] = IGNORE_INDEX  # its target was cut off; the last token of a sample predicts nothing
    if not (labels != IGNORE_INDEX).any():
        return None
    return dataclasses.replace(
        sample,
        input_ids=sample.input_ids[:cut],
        labels=labels,
        position_ids=sample.position_ids[:, :cut],
        pixel_values=sample.pixel_values[:kept_patches],
        image_grid_thw=sample.image_grid_thw[:kept_images],
        patch_positions=None if sample.patch_positions is None else sample.patch_positions[:kept_patches],
        meta={**sample.meta, "truncated_from": sample.num_tokens},
    )
