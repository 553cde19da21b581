import random
import re

import pytest

from vlm_train.data.grounding import (
    box_iou,
    dequantize,
    format_box,
    format_point,
    parse_box,
    quantize,
    to_relative,
)

BOX_TEXT = re.compile(r"^\(\d{3},\d{3}\),\(\d{3},\d{3}\)$")


def test_quantize_range_and_ends():
    assert quantize(0.0) == 0 and quantize(1.0) == 999
    assert quantize(-0.3) == 0 and quantize(1.7) == 999
    assert dequantize(0) == 0.0 and dequantize(999) == 1.0
    for q in range(1000):
        assert quantize(dequantize(q)) == q


def test_format_examples():
    assert format_box((52 / 999, 310 / 999, 480 / 999, 795 / 999)) == "(052,310),(480,795)"
    assert format_box((0, 0, 1, 1)) == "(000,000),(999,999)"
    assert format_point((0.0, 1.0)) == "(000,999)"


def test_format_is_three_digits_and_round_trips():
    rng = random.Random(0)
    for _ in range(500):
        x1, x2 = sorted(rng.random() for _ in range(2))
        y1, y2 = sorted(rng.random() for _ in range(2))
        text = format_box((x1, y1, x2, y2))
        assert BOX_TEXT.match(text), text
        parsed = parse_box(text)
        assert parsed is not None
        for got, want in zip(parsed, (x1, y1, x2, y2)):
            assert abs(got - want) <= 1 / 999


def test_pixels_and_normalized_give_same_text():
    w, h = 173, 61
    px = [12, 5, 140, 60]
    norm = [12 / w, 5 / h, 140 / w, 60 / h]
    assert format_box(to_relative(px, w, h, "pixels")) == format_box(to_relative(norm, w, h, "normalized"))
    # resize invariance: the same box on a twice-as-large image
    assert format_box(to_relative(px, w, h, "pixels")) == format_box(
        to_relative([2 * v for v in px], 2 * w, 2 * h, "pixels")
    )


@pytest.mark.parametrize(
    "box, w, h, fmt, message",
    [
        ([10, 5, 4, 8], 20, 20, "pixels", "x2 < x1"),
        ([1, 8, 4, 5], 20, 20, "pixels", "x2 < x1"),
        ([0, 0, 25, 10], 20, 20, "pixels", "outside"),
        ([-1, 0, 5, 10], 20, 20, "pixels", "outside"),
        ([0, 0, 1.2, 0.5], 20, 20, "normalized", "outside"),
        ([0, 0, 1, 1], 20, 20, "xyxy", "unknown box_format"),
        ([0, 0, 1, 1], 0, 20, "pixels", "image size"),
        ([0, 0, 1], 20, 20, "pixels", "4 numbers"),
        ([0, 0, float("nan"), 1], 20, 20, "pixels", "non-finite"),
    ],
)
def test_invalid_boxes_raise(box, w, h, fmt, message):
    with pytest.raises(ValueError, match=message):
        to_relative(box, w, h, fmt)


def test_parse_box_tolerant_and_none():
    assert parse_box("the box is ( 052 , 310 ) , ( 480 , 795 ).") == pytest.approx(
        (52 / 999, 310 / 999, 480 / 999, 795 / 999)
    )
    assert parse_box("(0 5 2,3 1 0),(4 8 0,7 9 5)") == pytest.approx((52 / 999, 310 / 999, 480 / 999, 795 / 999))
    first = parse_box("(001,002),(003,004) then (100,100),(200,200)")
    assert first == pytest.approx((1 / 999, 2 / 999, 3 / 999, 4 / 999))
    assert parse_box("no box here") is None
    assert parse_box("(52,310),(480,795)") is None  # not three digits
    assert parse_box("(052,310)") is None  # a point is not a box
    assert parse_box("(480,310),(052,795)") is None  # x2 < x1


def test_box_iou():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == pytest.approx(1.0)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 4, 4), (1, 1, 2, 2)) == pytest.approx(1 / 16)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
