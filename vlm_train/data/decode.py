"""Safe decoding of shard members: images checked from the header before a full decode; never pickle."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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
    ImageOps.exif_transpose(image, in_place=True)  # as transformers' load_image does
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as transformers' `convert_to_rgb` gives it, except that 16-bit grey is scaled, not clipped."""
    if image.mode in _WIDE_GREY_MODES:
        image = _wide_grey_to_8_bits(image)
    # The same test as transformers: an alpha band, or a tRNS colour / palette transparency in `info`.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_grey_to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit grey (32-bit "I" clipped to 0..65535) to 8 bits by its high byte; a tRNS grey value becomes alpha 0."""
    # PIL's own convert clips every value above 255 to white; its 16-bit colour PNG reading keeps the high byte.
    values = np.asarray(image)
    grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    transparent = image.info.get("transparency")
    if transparent is None:
        return Image.fromarray(grey)
    # Matched on the 16-bit value, before scaling, so neighbouring greys stay opaque.
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey, alpha], axis=-1))


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
