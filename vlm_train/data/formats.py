"""Turn a raw webdataset sample (member name -> bytes) into a conversation with images.

Formats (a source names one, or `auto` detects it from the members):
- caption: `key.jpg|png|webp` + `key.txt`, or `key.json` with a "caption" (img2dataset's layout);
- conversation: `key.json` with LLaVA "conversations" and images `key.jpg` or `key.0.jpg`, `key.1.jpg`, ...
  in placeholder order; `<box>[x1,y1,x2,y2]</box>` / `<point>[x,y]</point>` in the text become 000-999 text;
- grounding: `key.json` with "phrase" and "box" or "point" (or lists of them), in "pixels" or "normalized";
- text: `key.json` with "text", or `key.txt` alone when the source says format: text;
- interleaved: `key.json` with OBELICS' `texts` / `images` (images `key.0.jpg`, `key.1.jpg`, ...) or MMC4's
  `text_list` / `image_info` (images inline as `image_base64`, or members `key.<image_name>`).

Videos go where images go: `key.mp4|webm|mkv|avi|mov` (one), `key.0.mp4`, `key.1.webm`, ... (several), or a frame
folder `key.frames.000.jpg`, `key.frames.001.jpg`, ... with "fps" in `key.json`. A caption sample holds one image
or one video; a conversation holds one `<image>` per image and one `<video>` per video, each in member order.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlm_train.data.decode import (
    IMAGE_EXTENSIONS,
    SkipSample,
    decode_image,
    decode_json,
    decode_text,
)
from vlm_train.data.grounding import (
    format_box,
    format_point,
    to_relative,
    to_relative_point,
)

if TYPE_CHECKING:  # video decoding (PyAV) stays out of the import of every format
    from vlm_train.data.video import Video, VideoConfig

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # one per video in user turns, in video order (Sample.videos)
TASKS = ("caption", "conversation", "grounding", "text")  # Sample.task of the training formats
CAPTION_PROMPT = "Describe the image."
GROUNDING_PROMPT = "Where is the {phrase}?"
POINT_PROMPT = "Point to the {phrase}."
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
DEFAULT_FACTOR = 28  # patch_size * spatial_merge_size of Qwen2-VL / Qwen2.5-VL: frames resize to its multiples

_NUMBERED_IMAGE = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + ")$")
_NUMBERED_VIDEO = re.compile(r"^(\d+)\.(" + "|".join(VIDEO_EXTENSIONS) + ")$")
_FRAME = re.compile(r"^frames\.(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + ")$")
_BOX_TAG = re.compile(r"<box>\s*\[([^\]]*)\]\s*</box>")
_POINT_TAG = re.compile(r"<point>\s*\[([^\]]*)\]\s*</point>")


@dataclass
class Turn:
    role: str  # system | user | assistant | text (a plain document, no template); loss on assistant and text
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
    videos: list[Video] = field(default_factory=list)  # one per VIDEO_PLACEHOLDER, in order


def image_members(raw: dict[str, Any]) -> list[bytes]:
    """The sample's images in order: `jpg` (one image) or `0.jpg`, `1.jpg`, ... (several)."""
    numbered = sorted((int(m.group(1)), name) for name in raw if (m := _NUMBERED_IMAGE.match(name)))
    single = [name for name in IMAGE_EXTENSIONS if name in raw]
    if numbered and single:
        raise SkipSample("ambiguous_images", f"both {single[0]} and numbered images")
    if len(single) > 1:
        raise SkipSample("ambiguous_images", f"several image members {single}")
    if numbered and [n for n, _ in numbered] != list(range(len(numbered))):
        raise SkipSample("ambiguous_images", f"image numbers {[n for n, _ in numbered]} are not 0..{len(numbered) - 1}")
    return [raw[name] for _, name in numbered] or [raw[name] for name in single]


def video_members(raw: dict[str, Any]) -> list[bytes | list[bytes]]:
    """The sample's videos in order: a container's bytes for `mp4` (one video) or `0.mp4`, `1.webm`, ... (several),
    or, for the frame-folder form `frames.000.jpg`, `frames.001.jpg`, ..., one video as the list of frame bytes."""
    numbered = sorted((int(m.group(1)), name) for name in raw if (m := _NUMBERED_VIDEO.match(name)))
    single = [name for name in VIDEO_EXTENSIONS if name in raw]
    frames = sorted((int(m.group(1)), name) for name in raw if (m := _FRAME.match(name)))
    forms = [form for form, found in (("numbered", numbered), ("single", single), ("frames", frames)) if found]
    if len(forms) > 1:
        raise SkipSample("ambiguous_videos", f"videos in several forms {forms}, members {_members(raw)}")
    if len(single) > 1:
        raise SkipSample("ambiguous_videos", f"several video members {single}")
    for what, found in (("video", numbered), ("frame", frames)):
        # a gap means a lost member: frames would play too fast, or videos would pair with the wrong placeholder
        if found and [n for n, _ in found] != list(range(len(found))):
            raise SkipSample("ambiguous_videos", f"{what} numbers {[n for n, _ in found]} are not 0..{len(found) - 1}")
    if frames:
        return [[raw[name] for _, name in frames]]
    return [raw[name] for _, name in numbered] or [raw[name] for name in single]


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def detect_format(raw: dict[str, Any], record: dict | None) -> str:
    """The format a sample's members imply (for sources with format: auto)."""
    if is_interleaved(record):
        return INTERLEAVED  # OBELICS or MMC4 documents
    if record is not None and "conversations" in record:
        return "conversation"
    if record is not None and (record.get("task") == "grounding" or {"box", "boxes", "point", "points"} & set(record)):
        return "grounding"
    if image_members(raw) or video_members(raw):
        return "caption"
    if record is not None and "text" in record:
        return "text"
    if "txt" in raw or (record is not None and "caption" in record):
        raise SkipSample("missing_image", f"no image or video, members {_members(raw)}")
    raise SkipSample("unknown_format", f"members {_members(raw)}")


def _decode_images(raw: dict[str, Any], max_pixels: int) -> list[Image.Image]:
    return [decode_image(data, max_pixels) for data in image_members(raw)]


@dataclass(frozen=True)
class VideoOptions:
    """What decoding a video needs: the data config's frame sampling and budgets (None: VideoConfig's defaults), and
    the resize multiple, patch_size * merge_size of the model's PatchSpec."""

    config: VideoConfig | None = None
    factor: int = DEFAULT_FACTOR


def _fps(record: dict | None) -> float:
    """The frame rate of a frame-folder video, from the sample JSON's "fps"."""
    fps = record.get("fps") if record is not None else None
    if fps is None:
        raise SkipSample("missing_fps", "a frames.NNN.jpg video needs an 'fps' number in the sample's json")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)):
        raise SkipSample("bad_video_fps", f"fps={fps!r}")
    return float(fps)


def _decode_videos(raw: dict[str, Any], record: dict | None, options: VideoOptions) -> list[Video]:
    members = video_members(raw)
    if not members:
        return []
    from vlm_train.data.video import VideoConfig, decode_video, video_from_frames  # PyAV only where videos are

    cfg = options.config if options.config is not None else VideoConfig()
    return [
        video_from_frames(m, _fps(record), cfg, options.factor)
        if isinstance(m, list)
        else decode_video(m, cfg, options.factor)
        for m in members
    ]


def _one_image(raw: dict[str, Any], max_pixels: int) -> Image.Image:
    members = image_members(raw)
    if len(members) != 1:
        raise SkipSample(
            "missing_image" if not members else "image_count_mismatch", f"expected one image, members {_members(raw)}"
        )
    return decode_image(members[0], max_pixels)


def _caption(
    key: str, source: str, raw: dict[str, Any], record: dict | None, max_pixels: int, options: VideoOptions
) -> Sample:
    if "txt" in raw:
        caption = decode_text(raw["txt"])
    elif record is not None and isinstance(record.get("caption"), str):
        caption = record["caption"].strip()
    else:
        raise SkipSample("unknown_format", f"caption sample without txt or json caption, members {_members(raw)}")
    if not caption:
        raise SkipSample("empty_text")
    videos = video_members(raw)
    if videos:
        if image_members(raw):
            raise SkipSample(
                "image_count_mismatch",
                f"a caption sample holds one image or one video, not both, members {_members(raw)}",
            )
        if len(videos) != 1:
            raise SkipSample("video_count_mismatch", f"expected one video, members {_members(raw)}")
        # the image caption prompt: the model learns what "the image" means for a clip from the clip's turns
        turns = [Turn("user", VIDEO_PLACEHOLDER + CAPTION_PROMPT), Turn("assistant", caption)]
        return Sample(key, source, "caption", [], turns, {"answer": caption}, _decode_videos(raw, record, options))
    image = _one_image(raw, max_pixels)
    turns = [Turn("user", IMAGE_PLACEHOLDER + CAPTION_PROMPT), Turn("assistant", caption)]
    return Sample(key, source, "caption", [image], turns, {"answer": caption})


def _numbers(value: Any, count: int, what: str) -> list[list[float]]:
    """One or several groups of `count` numbers."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        groups = value
    else:
        groups = [value]
    for g in groups:
        if not isinstance(g, (list, tuple)) or len(g) != count or not all(isinstance(v, (int, float)) for v in g):
            raise ValueError(f"{what} must be {count} numbers (or a list of such), got {value!r}")
    return [list(g) for g in groups]


def _grounding(key: str, source: str, raw: dict[str, Any], record: dict, max_pixels: int) -> Sample:
    image = _one_image(raw, max_pixels)
    box_format = record.get("box_format", "pixels")
    try:
        phrase = str(record["phrase"])
        if "box" in record or "boxes" in record:
            boxes = _numbers(record.get("box", record.get("boxes")), 4, "box")
            rel = [to_relative(b, image.width, image.height, box_format) for b in boxes]
            answer, prompt = ";".join(format_box(b) for b in rel), GROUNDING_PROMPT
            meta: dict[str, Any] = {"box": list(rel[0]), "boxes": [list(b) for b in rel]}
        else:
            points = _numbers(record.get("point", record.get("points")), 2, "point")
            rel_points = [to_relative_point(p, image.width, image.height, box_format) for p in points]
            answer, prompt = ";".join(format_point(p) for p in rel_points), POINT_PROMPT
            meta = {"points": [list(p) for p in rel_points]}
    except (KeyError, TypeError, ValueError) as exc:
        raise SkipSample("bad_grounding", repr(exc)) from exc
    turns = [Turn("user", IMAGE_PLACEHOLDER + prompt.format(phrase=phrase)), Turn("assistant", answer)]
    return Sample(key, source, "grounding", [image], turns, {"answer": answer, **meta})


def _rewrite_tags(text: str, size: tuple[int, int] | None, box_format: str) -> str:
    """`<box>[...]</box>` and `<point>[...]</point>` -> 000-999 relative text."""

    def numbers(match: re.Match, count: int) -> list[float]:
        values = [float(v) for v in match.group(1).split(",")]
        if len(values) != count:
            raise ValueError(f"{match.group(0)!r} needs {count} numbers")
        if box_format == "pixels" and size is None:
            raise ValueError(f"{match.group(0)!r} is in pixels but the sample has no image")
        return values

    width, height = size or (1, 1)
    text = _BOX_TAG.sub(lambda m: format_box(to_relative(numbers(m, 4), width, height, box_format)), text)
    return _POINT_TAG.sub(lambda m: format_point(to_relative_point(numbers(m, 2), width, height, box_format)), text)


def _conversation(
    key: str, source: str, raw: dict[str, Any], record: dict, max_pixels: int, options: VideoOptions
) -> Sample:
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise SkipSample("bad_conversation", "'conversations' must be a non-empty list")
    members = image_members(raw)
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            raise SkipSample("bad_conversation", f"message is not an object: {message!r}")
        role = ROLES.get(str(message.get("from", message.get("role", ""))).lower())
        text = message.get("value", message.get("content"))
        if role is None or not isinstance(text, str):
            raise SkipSample("bad_conversation", f"message needs from/role in {sorted(ROLES)} and a text value")
        turns.append(Turn(role, text))
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(members):
        raise SkipSample(
            "image_count_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders, {len(members)} images"
        )
    videos = video_members(raw)
    placeholders = sum(t.text.count(VIDEO_PLACEHOLDER) for t in turns)
    if placeholders != len(videos):
        raise SkipSample(
            "video_count_mismatch", f"{placeholders} {VIDEO_PLACEHOLDER} placeholders, {len(videos)} videos"
        )
    if not any(t.role == "assistant" for t in turns):
        raise SkipSample("bad_conversation", "no assistant turn to learn from")
    for placeholder in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if any(t.role != "user" and placeholder in t.text for t in turns):
            raise SkipSample("bad_conversation", f"{placeholder} outside a user turn")
    images = _decode_images(raw, max_pixels)
    decoded_videos = _decode_videos(raw, record, options)
    try:
        size = images[0].size if images else None
        for turn in turns:
            turn.text = _rewrite_tags(turn.text, size, record.get("box_format", "normalized"))
    except ValueError as exc:
        raise SkipSample("bad_grounding", str(exc)) from exc
    answer = [t.text for t in turns if t.role == "assistant"][-1]
    return Sample(key, source, "conversation", images, turns, {"answer": answer}, decoded_videos)


def _text(key: str, source: str, raw: dict[str, Any], record: dict | None) -> Sample:
    if record is not None and isinstance(record.get("text"), str):
        text = record["text"].strip()
    elif "txt" in raw:
        text = decode_text(raw["txt"])
    else:
        raise SkipSample("unknown_format", f"text sample without json text or txt, members {_members(raw)}")
    if not text:
        raise SkipSample("empty_text")
    return Sample(key, source, "text", [], [Turn("text", text)], {"answer": text})


def numeric_fields(record: dict | None) -> dict[str, float]:
    """The top-level numbers of a sample's JSON (e.g. "importance": 2.0): they travel in the sample's meta, where
    the loss reads a per-sample weight (loss.importance_field) and metrics can group by them."""
    if record is None:
        return {}
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def label_list(record: dict | None) -> dict[str, list[str]]:
    """A sample JSON's `labels` (a list of strings: what the image shows), for a vision stage's multi-label loss."""
    labels = record.get("labels") if record is not None else None
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        return {"labels": list(labels)}
    return {}


def parse_sample(
    raw: dict[str, Any],
    source: str,
    max_image_pixels: int,
    fmt: str = "auto",
    *,
    video: VideoConfig | None = None,
    factor: int = DEFAULT_FACTOR,
) -> Sample:
    """Decode one raw sample in format `fmt` (auto: detected from its members); unusable ones raise SkipSample.

    Videos are sampled and resized by `video` (the data config's data.video; None: its defaults) to multiples of
    `factor` (patch_size * merge_size of the model's PatchSpec)."""
    options = VideoOptions(video, factor)
    key = str(raw.get("__key__", "?"))
    if "__error__" in raw:
        raise SkipSample("bad_member", raw["__error__"])
    record = decode_json(raw["json"]) if "json" in raw else None
    if fmt == "auto":
        fmt = detect_format(raw, record)
    if fmt in ("conversation", "grounding") and record is None:
        raise SkipSample("missing_json", f"a {fmt} sample needs a json member, members {_members(raw)}")
    if fmt == "caption":
        sample = _caption(key, source, raw, record, max_image_pixels, options)
    elif fmt == "conversation":
        sample = _conversation(key, source, raw, record, max_image_pixels, options)
    elif fmt == "grounding":
        sample = _grounding(key, source, raw, record, max_image_pixels)
    elif fmt == "text":
        sample = _text(key, source, raw, record)
    elif fmt == "interleaved":
        sample = parse_interleaved(key, source, raw, record, max_image_pixels)
    else:
        raise ValueError(f"unknown sample format {fmt!r}")
    sample.meta = {**numeric_fields(record), **label_list(record), **sample.meta}  # our own keys win over the JSON's
    return sample


# ---- interleaved documents (OBELICS / MMC4); splitting long ones is interleaved.py's ----------------------

INTERLEAVED = "interleaved"
ENTRIES = "entries"  # meta key: the document's entries in order, a text (str) or an image's index (int)
SEPARATOR = "separator"  # meta key: what joins two text entries in a row (TEXT_SEPARATOR or SENTENCE_SEPARATOR)
TEXT_SEPARATOR = "\n\n"  # between two OBELICS paragraphs; an image sits directly between its vision start and end
SENTENCE_SEPARATOR = " "  # between two MMC4 sentences, which are cut from running text (OpenFlamingo joins them so)
OBELICS, MMC4 = "obelics", "mmc4"


def interleaved_layout(record: dict | None) -> str | None:
    """OBELICS (parallel `texts` / `images` lists), MMC4 (`text_list` / `image_info`), or None."""
    if record is None:
        return None
    if isinstance(record.get("texts"), list) and isinstance(record.get("images"), list):
        return OBELICS
    if isinstance(record.get("text_list"), list) and isinstance(record.get("image_info"), list):
        return MMC4
    return None


def is_interleaved(record: dict | None) -> bool:
    """Whether a sample JSON has an interleaved layout (for format auto)."""
    return interleaved_layout(record) is not None


def parse_interleaved(key: str, source: str, raw: dict[str, Any], record: dict | None, max_pixels: int) -> Sample:
    """One document sample from its JSON: OBELICS' `texts` / `images` with numbered image members, or MMC4's
    `text_list` / `image_info` with each image inline (`image_base64`) or the member its `image_name` names."""
    layout = interleaved_layout(record)
    if layout == OBELICS:
        entries, decoded = _obelics_entries(raw, record, max_pixels)
        separator = TEXT_SEPARATOR
    elif layout == MMC4:
        entries, decoded = _mmc4_entries(raw, record, max_pixels)
        separator = SENTENCE_SEPARATOR
    else:
        raise SkipSample(
            "bad_interleaved",
            "an interleaved sample needs a json with lists `texts` and `images` (OBELICS) or `text_list` and "
            "`image_info` (MMC4)",
        )
    if not any(isinstance(e, str) for e in entries):
        raise SkipSample("empty_text", "an interleaved document without text")
    return document_sample(key, source, entries, decoded, separator)


def _obelics_entries(raw: dict[str, Any], record: dict, max_pixels: int) -> tuple[list[str | int], list[Image.Image]]:
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
    return entries, decoded


def _image_member(raw: dict[str, Any], number: int) -> str:
    for ext in IMAGE_EXTENSIONS:
        if f"{number}.{ext}" in raw:
            return f"{number}.{ext}"
    raise SkipSample(
        "missing_image", f"image entry {number} has no member {number}.jpg|png|..., members {_members(raw)}"
    )


def _mmc4_entries(raw: dict[str, Any], record: dict, max_pixels: int) -> tuple[list[str | int], list[Image.Image]]:
    """Each sentence, then the images matched to it (`matched_text_index`) in their `image_info` order."""
    sentences, infos = record["text_list"], record["image_info"]
    after: dict[int, list[int]] = {}  # sentence index -> the image_info indices placed after it
    for number, info in enumerate(infos):
        if not isinstance(info, dict):
            raise SkipSample("bad_interleaved", f"image_info[{number}] is {type(info).__name__}, not an object")
        index = info.get("matched_text_index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(sentences):
            raise SkipSample(
                "bad_matched_text_index",
                f"image_info[{number}] has matched_text_index {index!r}, not an index into the "
                f"{len(sentences)} sentences of text_list",
            )
        after.setdefault(index, []).append(number)
    entries: list[str | int] = []
    decoded: list[Image.Image] = []
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise SkipSample("bad_interleaved", f"text_list[{index}] is {type(sentence).__name__}, not a string")
        if sentence.strip():
            entries.append(sentence.strip())
        for number in after.get(index, []):
            decoded.append(decode_image(_mmc4_image(raw, infos[number], number), max_pixels))
            entries.append(len(decoded) - 1)
    return entries, decoded


def _mmc4_image(raw: dict[str, Any], info: dict, number: int) -> bytes:
    """An MMC4 image's bytes: inline as `image_base64` (OpenFlamingo's shards), else the member named by its
    `image_name` (`<key>.<image_name>` in the tar, whose reader lower-cases member suffixes)."""
    inline = info.get("image_base64")
    if isinstance(inline, str):
        try:  # not validated: line-wrapped base64 decodes; other stray characters end as a corrupt_image
            return base64.b64decode(inline)
        except ValueError as exc:  # bad padding (binascii.Error), non-ASCII text
            raise SkipSample("corrupt_image", f"image_info[{number}].image_base64: {exc}") from exc
    name = info.get("image_name")
    for member in (name, name.lower()) if isinstance(name, str) else ():
        if member in raw:
            return raw[member]
    raise SkipSample(
        "missing_image",
        f"image_info[{number}] has no image_base64 and no member named by its image_name {name!r}, "
        f"members {_members(raw)}",
    )


def document_sample(
    key: str, source: str, entries: list[str | int], images: list[Image.Image], separator: str = TEXT_SEPARATOR
) -> Sample:
    """A "text" sample of these entries, `separator` between two text entries in a row; image indices refer to
    `images` and are renumbered in order."""
    text, used = "", []
    for i, entry in enumerate(entries):
        if isinstance(entry, int):
            text += IMAGE_PLACEHOLDER
            used.append(images[entry])
            continue
        if i and isinstance(entries[i - 1], str):
            text += separator
        text += entry
    renumbered, n = [], 0
    for entry in entries:
        renumbered.append(n if isinstance(entry, int) else entry)
        n += isinstance(entry, int)
    answer = separator.join(e for e in entries if isinstance(e, str))
    meta = {ENTRIES: renumbered, SEPARATOR: separator, "answer": answer, "format": INTERLEAVED}
    return Sample(key, source, "text", used, [Turn("text", text)], meta)
