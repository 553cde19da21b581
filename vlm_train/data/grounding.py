"""Boxes and points written into text as 000-999 relative coordinates.

Relative coordinates survive any resize of the image, and a fixed width of three digits
makes every number exactly three digit tokens, so the model never has to guess a length.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

QUANT_MAX = 999
BOX_FORMATS = ("pixels", "normalized")

_NUM = r"(\d\s*\d\s*\d)"  # three digits; the model may emit them as separate tokens with spaces
_PAIR = r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)"
_BOX_RE = re.compile(_PAIR + r"\s*,\s*" + _PAIR)


def to_relative(
    box: Sequence[float], width: float, height: float, box_format: str
) -> tuple[float, float, float, float]:
    """Box [x1, y1, x2, y2] in `box_format` ("pixels" or "normalized") -> relative floats in [0, 1]."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box_format {box_format!r}; expected one of {BOX_FORMATS}")
    if len(box) != 4:
        raise ValueError(f"box must have 4 numbers [x1, y1, x2, y2], got {list(box)!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box has a non-finite coordinate: {list(box)!r}")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box)!r} has x2 < x1 or y2 < y1; expected [x1, y1, x2, y2]")
    if box_format == "pixels":
        if not (width > 0 and height > 0):
            raise ValueError(f"image size must be positive to convert a pixel box, got {width}x{height}")
        sx, sy = float(width), float(height)
    else:
        sx = sy = 1.0
    eps = 1e-6 * max(sx, sy)  # forgive float noise from upstream conversions, nothing more
    if x1 < -eps or y1 < -eps or x2 > sx + eps or y2 > sy + eps:
        limit = f"{width}x{height} image" if box_format == "pixels" else "range [0, 1]"
        raise ValueError(f"box {list(box)!r} ({box_format}) lies outside the {limit}")
    return _clamp01(x1 / sx), _clamp01(y1 / sy), _clamp01(x2 / sx), _clamp01(y2 / sy)


def to_relative_point(point: Sequence[float], width: float, height: float, box_format: str) -> tuple[float, float]:
    """Point [x, y] in `box_format` ("pixels" or "normalized") -> relative floats in [0, 1]."""
    if len(point) != 2:
        raise ValueError(f"point must have 2 numbers [x, y], got {list(point)!r}")
    x1, y1, _, _ = to_relative([point[0], point[1], point[0], point[1]], width, height, box_format)
    return x1, y1


def _clamp01(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def quantize(v: float) -> int:
    """Relative coordinate in [0, 1] -> integer in 0..999."""
    return min(max(int(round(v * QUANT_MAX)), 0), QUANT_MAX)


def dequantize(q: int) -> float:
    """Integer in 0..999 -> relative coordinate in [0, 1]."""
    return min(max(int(q), 0), QUANT_MAX) / QUANT_MAX


def format_point(rel_xy: Sequence[float]) -> str:
    """Relative (x, y) -> "(xxx,yyy)"."""
    x, y = rel_xy
    return f"({quantize(x):03d},{quantize(y):03d})"


def format_box(rel_box: Sequence[float]) -> str:
    """Relative [x1, y1, x2, y2] -> "(xxx,yyy),(xxx,yyy)"."""
    x1, y1, x2, y2 = rel_box
    return f"{format_point((x1, y1))},{format_point((x2, y2))}"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "(ddd,ddd),(ddd,ddd)" in `text` as relative coords; None if absent or not a valid box."""
    match = _BOX_RE.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (dequantize(int(re.sub(r"\s", "", g))) for g in match.groups())
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes in the same units; 0 when both are empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0
