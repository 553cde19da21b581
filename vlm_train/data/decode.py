"""Safe decoding of shard members: images checked from the header before a full decode; never pickle."""

from __future__ import annotations

import io
import json
import warnings

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    """A sample that cannot be used; `reason` becomes the `data/skipped/<reason>` counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB, honouring EXIF orientation; oversized or broken images raise SkipSample."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header: nothing decoded yet
            if width * height > max_pixels:
                raise SkipSample("image_too_large", f"{width}x{height}")
            image.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("image_too_large", str(exc)) from exc
    except Exception as exc:  # PIL raises many types for corrupt or truncated data
        raise SkipSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_json(data: bytes) -> dict:
    """Parse a JSON member; malformed JSON raises SkipSample."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkipSample("bad_json", str(exc)) from exc
    if not isinstance(value, dict):
        raise SkipSample("bad_json", "top level is not an object")
    return value


def decode_text(data: bytes) -> str:
    """Decode a UTF-8 text member."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SkipSample("bad_text", str(exc)) from exc
