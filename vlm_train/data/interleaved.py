"""Interleaved image-text documents (OBELICS / MMC4 layout) as plain-text samples with their images in place.

A sample's `json` holds parallel lists `texts` and `images`; at each index exactly one of them is non-null. The k-th
non-null image entry (k = 0, 1, ...) is the member `k.jpg|jpeg|png|webp`; the JSON's image values (URLs in OBELICS)
are not used to find it. A missing image member is a counted skip (`missing_image`).

A document is one "text" turn (loss on its text and its end token, none on image tokens): text entries joined by a
blank line, each image an IMAGE_PLACEHOLDER where it stands. `split_document` cuts a document too long for one pack
into several samples between entries, never inside an image; a single text entry longer than a pack stays whole in
its own part and is left to data.pack.too_long (truncate: cut at its end; drop: counted and dropped).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlm_train.data.decode import IMAGE_EXTENSIONS, SkipSample, decode_image
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import scaled_size

if TYPE_CHECKING:
    from vlm_train.data.encode import Encoder
    from vlm_train.data.pack_planner import Budget

FORMAT = "interleaved"
ENTRIES = "entries"  # meta key: the document's entries in order, a text (str) or an image's index (int)
TEXT_SEPARATOR = "\n\n"  # between two text entries; an image sits directly between its vision start and end


def is_interleaved(record: dict | None) -> bool:
    """Whether a sample JSON has the interleaved layout (for format auto)."""
    return record is not None and isinstance(record.get("texts"), list) and isinstance(record.get("images"), list)


def parse_interleaved(key: str, source: str, raw: dict[str, Any], record: dict | None, max_pixels: int) -> Sample:
    """One document sample from its JSON's `texts` / `images` and the numbered image members."""
    if not is_interleaved(record):
        raise SkipSample("bad_interleaved", "an interleaved sample needs a json with lists `texts` and `images`")
    texts, images = record["texts"], record["images"]
    if len(texts) != len(images):
        raise SkipSample("bad_interleaved", f"{len(texts)} texts but {len(images)} images entries")
    entries: list[str | int] = []
    decoded: list[Image.Image] = []
    for index, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SkipSample("bad_interleaved", f"entry {index}: exactly one of text and image must be set")
        if text is not None:
            if not isinstance(text, str):
                raise SkipSample("bad_interleaved", f"entry {index}: text is {type(text).__name__}, not a string")
            if text.strip():
                entries.append(text.strip())
            continue
        member = _image_member(raw, len(decoded))
        decoded.append(decode_image(raw[member], max_pixels))
        entries.append(len(decoded) - 1)
    if not any(isinstance(e, str) for e in entries):
        raise SkipSample("empty_text", "an interleaved document without text")
    return document_sample(key, source, entries, decoded)


def _image_member(raw: dict[str, Any], number: int) -> str:
    for ext in IMAGE_EXTENSIONS:
        if f"{number}.{ext}" in raw:
            return f"{number}.{ext}"
    members = sorted(k for k in raw if not k.startswith("__"))
    raise SkipSample("missing_image", f"image entry {number} has no member {number}.jpg|png|..., members {members}")


def document_sample(key: str, source: str, entries: list[str | int], images: list[Image.Image]) -> Sample:
    """A "text" sample of these entries; image indices refer to `images` and are renumbered in order."""
    text, used = "", []
    for i, entry in enumerate(entries):
        if isinstance(entry, int):
            text += IMAGE_PLACEHOLDER
            used.append(images[entry])
            continue
        if i and isinstance(entries[i - 1], str):
            text += TEXT_SEPARATOR
        text += entry
    renumbered, n = [], 0
    for entry in entries:
        renumbered.append(n if isinstance(entry, int) else entry)
        n += isinstance(entry, int)
    answer = TEXT_SEPARATOR.join(e for e in entries if isinstance(e, str))
    meta = {ENTRIES: renumbered, "answer": answer, "format": FORMAT}
    return Sample(key, source, "text", used, [Turn("text", text)], meta)


def entry_costs(sample: Sample, encoder: Encoder) -> list[tuple[int, int]]:
    """(LLM tokens, ViT patches) of each entry as the encoder lays it out: a text's tokens with the separator before
    it, an image's pad tokens with its vision start and end (at the sampling's largest scale, with no token drop)."""
    spec, merge = encoder.spec, encoder.spec.merge_size
    entries = sample.meta[ENTRIES]
    costs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, int):
            image = sample.images[entry]
            h, w = scaled_size(image.height, image.width, spec, encoder.sampling.scale_max)
            patches = (h // spec.patch_size) * (w // spec.patch_size)
            costs.append((patches // merge**2 + 2, patches))
        else:
            sep = TEXT_SEPARATOR if i and isinstance(entries[i - 1], str) else ""
            costs.append((len(encoder.tokenizer.encode(sep + entry, add_special_tokens=False)), 0))
    return costs


def split_document(sample: Sample, encoder: Encoder, budget: Budget) -> list[Sample]:
    """The document as parts that each fit the pack budgets, cut between entries (an image is never split); parts
    are keyed `<key>#<n>`. A document that fits is returned whole. Token counts are those of each entry encoded on
    its own, which BPE merges across an entry's edge can only shorten, so a part may come out a token shorter."""
    costs = entry_costs(sample, encoder)
    entries = sample.meta[ENTRIES]
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
        part = document_sample(f"{sample.key}#{n}", sample.source, [entries[i] for i in indices], sample.images)
        if not any(isinstance(entries[i], str) for i in indices):
            continue  # images alone would teach nothing (no text tokens to predict)
        out.append(dataclasses.replace(part, meta={**sample.meta, **part.meta, "part": n}))
    return out
