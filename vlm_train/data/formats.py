"""Turn a raw webdataset sample (member name -> bytes) into a conversation with images."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm_train.data.decode import IMAGE_EXTENSIONS, SkipSample, decode_image, decode_json, decode_text
from vlm_train.data.grounding import format_box, to_relative

IMAGE_PLACEHOLDER = "<image>"
CAPTION_PROMPT = "Describe the image."
GROUNDING_PROMPT = "Where is the {phrase}?"


@dataclass
class Turn:
    role: str  # "user" or "assistant"; loss falls on assistant turns only
    text: str  # user turns hold one IMAGE_PLACEHOLDER per image, in image order


@dataclass
class Sample:
    """One decoded training sample: images and the turns that refer to them."""

    key: str
    source: str
    task: str
    images: list[Image.Image]
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)


def _image_member(raw: dict[str, bytes]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    raise SkipSample("missing_image", f"members {sorted(k for k in raw if not k.startswith('__'))}")


def _caption(key: str, source: str, image: Image.Image, caption: str) -> Sample:
    if not caption:
        raise SkipSample("empty_text")
    turns = [Turn("user", IMAGE_PLACEHOLDER + CAPTION_PROMPT), Turn("assistant", caption)]
    return Sample(key, source, "caption", [image], turns, {"answer": caption})


def _grounding(key: str, source: str, image: Image.Image, record: dict) -> Sample:
    try:
        phrase = str(record["phrase"])
        box = to_relative(record["box"], image.width, image.height, record.get("box_format", "pixels"))
    except (KeyError, TypeError, ValueError) as exc:
        raise SkipSample("bad_grounding", repr(exc)) from exc
    answer = format_box(box)
    turns = [Turn("user", IMAGE_PLACEHOLDER + GROUNDING_PROMPT.format(phrase=phrase)), Turn("assistant", answer)]
    return Sample(key, source, "grounding", [image], turns, {"answer": answer, "box": list(box)})


def parse_sample(raw: dict[str, Any], source: str, max_image_pixels: int) -> Sample:
    """Decode one raw sample; detects the format from its members. Unusable samples raise SkipSample."""
    key = str(raw.get("__key__", "?"))
    image = decode_image(_image_member(raw), max_image_pixels)
    if "json" in raw:
        record = decode_json(raw["json"])
        if record.get("task") == "grounding" or "box" in record:
            return _grounding(key, source, image, record)
        if "caption" in record:
            return _caption(key, source, image, str(record["caption"]).strip())
        raise SkipSample("unknown_format", f"json keys {sorted(record)}")
    if "txt" in raw:
        return _caption(key, source, image, decode_text(raw["txt"]))
    raise SkipSample("unknown_format", f"members {sorted(k for k in raw if not k.startswith('__'))}")
