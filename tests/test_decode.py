import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm_train.data.decode import SkipSample, decode_image, decode_json
from vlm_train.data.formats import parse_sample


def _bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK", "I;16", "LA"])
def test_every_common_mode_decodes_to_rgb(mode):
    image = Image.new("RGB", (30, 20), (200, 30, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_image(_bytes(image, fmt), max_pixels=10_000)
    assert decoded.mode == "RGB" and decoded.size == (30, 20)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    decoded = decode_image(_bytes(image, "JPEG", exif=exif), max_pixels=10_000)
    assert decoded.size == (20, 40)


def test_oversized_image_is_refused_from_its_header():
    data = _bytes(Image.new("RGB", (400, 300)))
    with pytest.raises(SkipSample) as err:
        decode_image(data, max_pixels=100_000)
    assert err.value.reason == "image_too_large"


@pytest.mark.parametrize("data", [b"not an image", _bytes(Image.new("RGB", (64, 64)), "PNG")[:60]])
def test_corrupt_or_truncated_image_is_skipped(data):
    with pytest.raises(SkipSample) as err:
        decode_image(data, max_pixels=10_000)
    assert err.value.reason == "corrupt_image"


def test_bad_json_and_unknown_members_are_skipped_with_reasons():
    with pytest.raises(SkipSample, match="bad_json"):
        decode_json(b"{not json")
    png = _bytes(Image.new("RGB", (56, 56)))
    with pytest.raises(SkipSample) as err:
        parse_sample({"__key__": "k", "png": png, "cls": b"3"}, "src", 10_000)
    assert err.value.reason == "unknown_format"
    with pytest.raises(SkipSample) as err:
        parse_sample({"__key__": "k", "txt": b"a caption"}, "src", 10_000)
    assert err.value.reason == "missing_image"


def test_grounding_answer_is_written_as_relative_000_999_coordinates():
    png = _bytes(Image.new("RGB", (200, 100)))
    record = b'{"task": "grounding", "phrase": "red circle", "box": [20, 10, 120, 90], "box_format": "pixels"}'
    parsed = parse_sample({"__key__": "k", "png": png, "json": record}, "src", 1_000_000)
    assert parsed.turns[-1].text == "(100,100),(599,899)"
    assert parsed.turns[0].text.endswith("Where is the red circle?")
    assert np.allclose(parsed.meta["box"], [0.1, 0.1, 0.6, 0.9])


def _claiming(width: int, height: int) -> bytes:
    """A one-pixel PNG whose header claims width x height (CRC fixed), as a decompression bomb would."""
    data = bytearray(_bytes(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize("side,limit", [(5000, 10_000), (60000, 89_478_485)])
def test_a_bomb_is_refused_from_its_header_without_decoding(side, limit):
    # The pixel data is one pixel: had it been decoded, the error would be a corrupt image, not a size.
    with pytest.raises(SkipSample) as err:
        decode_image(_claiming(side, side), max_pixels=limit)
    assert err.value.reason == "image_too_large"


def test_palette_with_transparency_and_16_bit_grey_keep_their_content():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.info["transparency"] = 0  # index 0 (red) is transparent: it must come out as the white background
    decoded = decode_image(_bytes(palette), max_pixels=10_000)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    value = decode_image(_bytes(grey16), max_pixels=10_000).getpixel((0, 0))
    assert value == (156, 156, 156)  # 40000 / 256, scaled rather than clipped to 255
