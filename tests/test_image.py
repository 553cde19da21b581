import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from vlm_train.data.image import (
    ImageSampling,
    PatchSpec,
    image_to_patches,
    normalise_patches,
    resize_image,
    scaled_size,
    smart_resize,
    window_positions,
)


@pytest.mark.parametrize("size", [(130, 70), (56, 56), (300, 40), (20, 20), (500, 400)])
def test_patches_equal_the_qwen2_vl_image_processor(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    spec = PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168)
    reference = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)(
        images=[image], return_tensors="np"
    )
    patches, grid = image_to_patches(image, spec)
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    # The loader carries raw pixels of one frame; normalised and repeated over t they are HF's pixel_values.
    assert patches.dtype == np.uint8 and patches.shape == (reference["pixel_values"].shape[0], spec.pixel_dim)
    expanded = normalise_patches(patches, spec.temporal_patch_size)
    assert expanded.dtype == np.float32 and expanded.shape == reference["pixel_values"].shape
    np.testing.assert_allclose(expanded, reference["pixel_values"], atol=1e-5)


def test_model_side_normalisation_equals_the_data_side_bit_for_bit():
    from vlm_train.model.vit import float_pixel_values

    spec = PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168)
    every_value = np.arange(256, dtype=np.uint8).repeat(3)  # each level in each channel
    image = Image.fromarray(np.resize(every_value, (84, 112, 3)))
    patches, _ = image_to_patches(image, spec)
    expected = torch.from_numpy(normalise_patches(patches, spec.temporal_patch_size))
    got = float_pixel_values(torch.from_numpy(patches), spec.patch_dim)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # Rows that already hold all t frames are only normalised.
    two_frames = torch.from_numpy(patches).view(-1, 3, 1, 196).expand(-1, 3, 2, 196).reshape(-1, spec.patch_dim)
    assert torch.equal(float_pixel_values(two_frames, spec.patch_dim), expected)
    with pytest.raises(ValueError, match="uint8"):
        float_pixel_values(expected, spec.patch_dim)


def test_torch_resize_is_within_a_few_levels_of_pil():
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:300, 0:410]
    smooth = np.stack([127 + 100 * np.sin(x / (9 + 4 * c) + y / 23) for c in range(3)], -1)  # photo-like gradients
    image = Image.fromarray((smooth + rng.normal(0, 4, smooth.shape)).clip(0, 255).astype(np.uint8))
    for height, width in [(280, 392), (588, 812), (112, 168)]:  # near 1:1, upscale, downscale
        pil = resize_image(image, height, width, "pil").astype(int)
        fast = resize_image(image, height, width, "torch").astype(int)
        assert fast.shape == pil.shape == (height, width, 3)
        assert np.abs(fast - pil).max() <= 8 and np.abs(fast - pil).mean() < 0.05  # mostly equal, a few +-1
    assert np.array_equal(resize_image(image, 300, 410, "torch"), np.asarray(image))  # same size: untouched
    fast_spec = PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168, resize="torch")
    assert image_to_patches(image, fast_spec)[1] == image_to_patches(image, PatchSpec(max_pixels=168 * 168))[1]
    with pytest.raises(ValueError, match="resize method"):
        PatchSpec(resize="cv2")


def test_smart_resize_keeps_bounds_and_multiples():
    spec = PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168)
    for h, w in [(10, 10), (1000, 30), (168, 168), (97, 233)]:
        rh, rw = smart_resize(h, w, spec)
        assert rh % 28 == 0 and rw % 28 == 0
        assert spec.min_pixels <= rh * rw <= spec.max_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000, spec)


def test_resolution_sampling_scales_within_the_range_and_keeps_bounds():
    spec = PatchSpec(min_pixels=56 * 56, max_pixels=336 * 336)
    base = smart_resize(224, 336, spec)
    rng = np.random.default_rng(0)
    sampling = ImageSampling(scale_min=0.5, scale_max=1.0)
    sizes = {scaled_size(224, 336, spec, sampling.scale(rng)) for _ in range(50)}
    assert len(sizes) > 3 and base in sizes | {base}
    for h, w in sizes:
        assert h % 28 == 0 and w % 28 == 0 and spec.min_pixels <= h * w <= spec.max_pixels
        assert h <= base[0] and w <= base[1] and abs(w / h - 1.5) < 0.35  # aspect kept to the rounding
    assert ImageSampling().scale(rng) == 1.0
    with pytest.raises(ValueError, match="scale range"):
        ImageSampling(scale_min=1.2, scale_max=1.0)


def test_window_positions_follow_merge_order():
    positions = window_positions((1, 4, 6), merge_size=2)
    assert positions[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # the first 2x2 window
    assert positions[4:8].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert sorted(map(tuple, positions.tolist())) == [(r, c) for r in range(4) for c in range(6)]


def test_token_drop_keeps_whole_windows_and_some_images_whole():
    from vlm_train.data.encode import Encoder

    from helpers import sample, tiny_tokenizer

    spec = PatchSpec(min_pixels=112 * 112, max_pixels=168 * 168)
    enc = Encoder(tiny_tokenizer(), spec, ImageSampling(drop_prob=0.5, drop_rate_min=0.25, drop_rate_max=0.5))
    full = Encoder(tiny_tokenizer(), spec).encode(sample("k", "x"))
    dropped_counts = []
    for seed in range(12):
        encoded = enc.encode(sample("k", "x"), rng=np.random.default_rng(seed))
        windows = encoded.num_patches // 4
        assert int((encoded.input_ids == enc.special.image_pad).sum()) == windows
        assert encoded.patch_positions.shape == (encoded.num_patches, 2)
        # Every kept patch is the full image's patch at that (row, column).
        all_positions = window_positions(tuple(full.image_grid_thw[0]), 2)
        index = {tuple(p): i for i, p in enumerate(all_positions.tolist())}
        rows = [index[tuple(p)] for p in encoded.patch_positions.tolist()]
        np.testing.assert_array_equal(encoded.pixel_values, full.pixel_values[rows])
        assert encoded.image_grid_thw.tolist() == full.image_grid_thw.tolist()
        # Image tokens keep their M-RoPE places, and the text after the image is not moved.
        pad = enc.special.image_pad
        kept = np.asarray(rows[::4]) // 4
        full_image = full.position_ids[:, full.input_ids == pad]
        np.testing.assert_array_equal(encoded.position_ids[:, encoded.input_ids == pad], full_image[:, kept])
        np.testing.assert_array_equal(encoded.position_ids[:, -5:], full.position_ids[:, -5:])
        dropped_counts.append(full.num_patches // 4 - windows)
    assert 0 in dropped_counts and max(dropped_counts) > 0  # both whole and dropped images are seen
    assert max(dropped_counts) <= full.num_patches // 4 // 2
