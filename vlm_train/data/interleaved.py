"""Interleaved image-text documents: splitting one too long for a pack. Parsing them into plain-text samples with
their images in place is formats.py's (`parse_interleaved`), from either layout:

- OBELICS: the sample's `json` holds parallel lists `texts` and `images`; at each index exactly one of them is
  non-null. The k-th non-null image entry (k = 0, 1, ...) is the member `k.jpg|jpeg|png|webp`; the JSON's image
  values (URLs) are not used to find it. Text entries are paragraphs, joined by a blank line.
- MMC4: the `json` holds `text_list` (sentences) and `image_info` (one object per image). Each image goes right after
  the sentence its `matched_text_index` names; several after one sentence keep their `image_info` order. Its bytes
  are inline as `image_base64` (OpenFlamingo's MMC4 shards), else the member named by its `image_name`
  (`key.<image_name>`). Sentences are joined by a space. A `matched_text_index` that is not an index into
  `text_list` is a counted skip (`bad_matched_text_index`).

A missing image (member or inline bytes) is a counted skip (`missing_image`). A document is one "text" turn (loss on
its text and its end token, none on image tokens): its text entries joined by the layout's separator (meta
`separator`), each image an IMAGE_PLACEHOLDER where it stands. `split_document` cuts a document too long for one
pack into several samples between entries, never inside an image; a single text entry longer than a pack stays
whole in its own part and is left to data.pack.too_long (truncate: cut at its end; drop: counted and dropped).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from vlm_train.data.formats import ENTRIES, SEPARATOR, TEXT_SEPARATOR, Sample, document_sample
from vlm_train.data.image import scaled_size

if TYPE_CHECKING:
    from vlm_train.data.encode import Encoder
    from vlm_train.data.pack_planner import Budget

__all__ = ["ENTRIES", "entry_costs", "split_document"]


def entry_costs(sample: Sample, encoder: Encoder) -> list[tuple[int, int]]:
    """(LLM tokens, ViT patches) of each entry as the encoder lays it out: a text's tokens with the separator before
    it, an image's pad tokens with its vision start and end (at the sampling's largest scale, with no token drop)."""
    spec, merge = encoder.spec, encoder.spec.merge_size
    entries = sample.meta[ENTRIES]
    separator = sample.meta.get(SEPARATOR, TEXT_SEPARATOR)
    costs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, int):
            image = sample.images[entry]
            h, w = scaled_size(image.height, image.width, spec, encoder.sampling.scale_max)
            patches = (h // spec.patch_size) * (w // spec.patch_size)
            costs.append((patches // merge**2 + 2, patches))
        else:
            sep = separator if i and isinstance(entries[i - 1], str) else ""
            costs.append((len(encoder.tokenizer.encode(sep + entry, add_special_tokens=False)), 0))
    return costs


def split_document(sample: Sample, encoder: Encoder, budget: Budget) -> list[Sample]:
    """The document as parts that each fit the pack budgets, cut between entries (an image is never split); parts
    are keyed `<key>#<n>`. A document that fits is returned whole. Token counts are those of each entry encoded on
    its own, which BPE merges across an entry's edge can only shorten, so a part may come out a token shorter."""
    costs = entry_costs(sample, encoder)
    entries = sample.meta[ENTRIES]
    separator = sample.meta.get(SEPARATOR, TEXT_SEPARATOR)
    limit_tokens = budget.tokens - 1  # the document's end token
    parts: list[list[int]] = [[]]  # entry indices per part
    tokens = patches = images = 0
    for i, (entry_tokens, entry_patches) in enumerate(costs):
        is_image = isinstance(entries[i], int)
        over = (
            tokens + entry_tokens > limit_tokens
            or patches + entry_patches > budget.patches
            or (is_image and budget.images and images + 1 > budget.images)
        )
        if over and parts[-1]:
            parts.append([])
            tokens = patches = images = 0
        if not parts[-1] and not is_image and i and isinstance(entries[i - 1], str):
            entry_tokens = len(encoder.tokenizer.encode(entries[i], add_special_tokens=False))  # no separator
        parts[-1].append(i)
        tokens, patches, images = tokens + entry_tokens, patches + entry_patches, images + is_image
    if len(parts) == 1:
        return [sample]
    out = []
    for n, indices in enumerate(parts):
        chosen = [entries[i] for i in indices]
        part = document_sample(f"{sample.key}#{n}", sample.source, chosen, sample.images, separator)
        if not any(isinstance(entries[i], str) for i in indices):
            continue  # images alone would teach nothing (no text tokens to predict)
        out.append(dataclasses.replace(part, meta={**sample.meta, **part.meta, "part": n}))
    return out
