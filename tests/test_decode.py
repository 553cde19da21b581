import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, features
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

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


# Equality with transformers: its image processors (PIL and torchvision backends alike) turn a PIL image into
# RGB with `convert_to_rgb`, and its `load_image` applies the EXIF orientation first.

_RNG = np.random.default_rng(0)
_RGB = _RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
_ALPHA = _RNG.integers(0, 256, (16, 24), dtype=np.uint8)
_ALPHA[0, :3] = (0, 255, 128)  # fully transparent, opaque and partial pixels, whatever the draw
_GREY = np.asarray(Image.fromarray(_RGB).convert("L"))
_WEBP = features.check("webp")


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes 16 bits only for plain grey)."""
    height, width = array.shape[:2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette() -> Image.Image:
    return Image.fromarray(_RGB).quantize(32)


def _pa_tiff() -> bytes:
    # PNG has no palette+alpha colour type (PIL writes PA as P with tRNS), TIFF keeps it as PA.
    image = _palette().convert("PA")
    image.putalpha(Image.fromarray(_ALPHA))
    return _bytes(image, "TIFF")


def _rgb_with_trns() -> bytes:
    rgb = _RGB.copy()
    rgb[2:6, 3:9] = (10, 20, 30)  # the tRNS colour is present
    return _bytes(Image.fromarray(rgb), transparency=(10, 20, 30))


_WIDE = (_RGB.astype(np.uint16) << 8) | _RNG.integers(0, 256, _RGB.shape, dtype=np.uint16)
_WIDE_ALPHA = (_ALPHA.astype(np.uint16) << 8) | _RNG.integers(0, 256, _ALPHA.shape, dtype=np.uint16)

# name: (bytes, mode PIL opens it in, whether transparency changes the picture)
_AS_HF = {
    "1-png": (lambda: _bytes(Image.fromarray(_GREY > 127)), "1", False),
    "1-png-trns": (lambda: _bytes(Image.fromarray(_GREY > 127), transparency=0), "1", True),
    "L-png": (lambda: _bytes(Image.fromarray(_GREY)), "L", False),
    "L-png-trns": (lambda: _bytes(Image.fromarray(_GREY), transparency=int(_GREY[5, 5])), "L", True),
    "LA-png": (lambda: _bytes(Image.fromarray(np.dstack([_GREY, _ALPHA]))), "LA", True),
    # PIL opens 16-bit grey+alpha as RGBA, keeping the high bytes.
    "LA-png16": (lambda: _png16(np.dstack([_WIDE[..., 0], _WIDE_ALPHA]), 4), "RGBA", True),
    "P-png": (lambda: _bytes(_palette()), "P", False),
    "P-png-trns-index": (lambda: _bytes(_palette(), transparency=_palette().getpixel((5, 5))), "P", True),
    "P-png-trns-alphas": (lambda: _bytes(_palette(), transparency=bytes(range(0, 256, 8))), "P", True),
    "PA-tiff": (_pa_tiff, "PA", True),
    "RGB-png": (lambda: _bytes(Image.fromarray(_RGB)), "RGB", False),
    "RGB-png-trns": (_rgb_with_trns, "RGB", True),
    "RGB-png16": (lambda: _png16(_WIDE, 2), "RGB", False),
    "RGBA-png": (lambda: _bytes(Image.fromarray(np.dstack([_RGB, _ALPHA]))), "RGBA", True),
    "RGBA-png16": (lambda: _png16(np.dstack([_WIDE, _WIDE_ALPHA]), 6), "RGBA", True),
    "CMYK-jpeg": (lambda: _bytes(Image.fromarray(_RGB).convert("CMYK"), "JPEG"), "CMYK", False),
    "L-jpeg": (lambda: _bytes(Image.fromarray(_GREY), "JPEG"), "L", False),
    "RGB-jpeg": (lambda: _bytes(Image.fromarray(_RGB), "JPEG"), "RGB", False),
    "RGB-webp": (lambda: _bytes(Image.fromarray(_RGB), "WEBP", lossless=True), "RGB", False),
    "RGBA-webp": (lambda: _bytes(Image.fromarray(np.dstack([_RGB, _ALPHA])), "WEBP", lossless=True), "RGBA", True),
}


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("name", list(_AS_HF))
def test_every_mode_decodes_to_the_pixels_of_transformers(name):
    build, mode, transparent = _AS_HF[name]
    if "webp" in name and not _WEBP:
        pytest.skip("PIL built without WebP")
    data = build()
    assert _open(data).mode == mode  # the case holds the mode it is named for
    expected = convert_to_rgb(_open(data), return_numpy=True)
    # Real transparency: compositing on white changes pixels that dropping the alpha would not.
    alpha_dropped = np.asarray(_open(data).convert("RGBA"))[..., :3]
    assert transparent == (not np.array_equal(expected, alpha_dropped))
    decoded = decode_image(data, max_pixels=10_000)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_equals_transformers_load_image(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _bytes(Image.fromarray(_RGB), "JPEG", exif=exif)
    expected = np.asarray(load_image(base64.b64encode(data).decode("ascii")))
    np.testing.assert_array_equal(np.asarray(decode_image(data, max_pixels=10_000)), expected)


@pytest.mark.parametrize("name", ["RGBA-png", "P-png-trns-index", "RGB-png-trns"])
def test_exif_orientation_keeps_transparency(name):
    image = _open(_AS_HF[name][0]())
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _bytes(image, exif=exif, transparency=image.info.get("transparency"))
    expected = convert_to_rgb(ImageOps.exif_transpose(_open(data)), return_numpy=True)
    decoded = decode_image(data, max_pixels=10_000)
    assert decoded.size == (16, 24)
    np.testing.assert_array_equal(np.asarray(decoded), expected)


# Documented difference: transformers converts 16-bit grey ("I;16", and 32-bit "I") with PIL's convert, which
# clips every value above 255 to white; we keep the high byte, as PIL does for 16-bit colour PNGs.


def test_16_bit_grey_keeps_its_high_byte_where_transformers_clips_to_white():
    data = _bytes(Image.fromarray(_WIDE[..., 0]))
    assert _open(data).mode == "I;16"
    decoded = np.asarray(decode_image(data, max_pixels=10_000))
    np.testing.assert_array_equal(decoded, np.repeat(_RGB[..., :1], 3, axis=-1))
    clipped = np.minimum(_WIDE[..., :1], 255).astype(np.uint8).repeat(3, axis=-1)
    np.testing.assert_array_equal(convert_to_rgb(_open(data), return_numpy=True), clipped)  # the difference
    # The same 16-bit values as a colour PNG decode to the same pixels: grey is no special case.
    as_colour = decode_image(_png16(np.repeat(_WIDE[..., :1], 3, axis=-1), 2), max_pixels=10_000)
    np.testing.assert_array_equal(decoded, np.asarray(as_colour))


def test_16_bit_grey_trns_makes_exactly_that_value_white():
    values = _WIDE[..., 0].copy()
    key = int(values[5, 5])
    values[values // 256 == key // 256] = key ^ 1  # same high byte, other 16-bit value: must stay opaque
    values[5, 5] = key
    data = _bytes(Image.fromarray(values), transparency=key)
    assert _open(data).mode == "I;16" and _open(data).info["transparency"] == key
    expected = np.where(values == key, 255, values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_image(data, max_pixels=10_000)), np.dstack([expected] * 3))


def test_32_bit_grey_is_clipped_to_16_bits_then_keeps_its_high_byte():
    values = np.array([[-5, 0, 255, 256, 40000, 65535, 70000]], dtype=np.int32)
    data = _bytes(Image.fromarray(values), "TIFF")
    assert _open(data).mode == "I"
    decoded = np.asarray(decode_image(data, max_pixels=10_000))[..., 0]
    assert decoded.tolist() == [[0, 0, 0, 1, 156, 255, 255]]


def test_generate_tool_reads_images_as_training_decodes_them(tmp_path):
    from vlm_train.cli.generate import read_images

    data = _AS_HF["RGBA-png"][0]()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    (image,) = read_images([str(path)])
    np.testing.assert_array_equal(np.asarray(image), np.asarray(decode_image(data, max_pixels=10_000)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png cannot be read"):
        read_images([str(tmp_path / "bad.png")])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_images([str(tmp_path / "missing.png")])
