import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlm_train.data.image import PatchSpec, image_to_patches, smart_resize


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
    np.testing.assert_allclose(patches, reference["pixel_values"], atol=1e-5)


def test_smart_resize_keeps_bounds_and_multiples():
    spec = PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168)
    for h, w in [(10, 10), (1000, 30), (168, 168), (97, 233)]:
        rh, rw = smart_resize(h, w, spec)
        assert rh % 28 == 0 and rw % 28 == 0
        assert spec.min_pixels <= rh * rw <= spec.max_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000, spec)
