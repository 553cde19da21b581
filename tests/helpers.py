"""Small builders shared by tests: samples with images, and the tiny tokenizer/encoder."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from vlm_train.data.encode import Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import PatchSpec
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tokenizer import build_tiny_tokenizer
from vlm_train.model import LLMConfig, ModelConfig, VisionConfig

SPEC = PatchSpec(min_pixels=56 * 56, max_pixels=168 * 168)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    return build_tiny_tokenizer(corpus_lines())


def encoder() -> Encoder:
    return Encoder(tiny_tokenizer(), SPEC)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def sample(key: str, answer: str, images: int = 1, prompt: str = "Describe the image.", seed: int = 0) -> Sample:
    """A conversation with `images` noise images (of different sizes) before the prompt."""
    pictures = [noise_image(56 + 28 * i, 84 - 14 * i, seed + i) for i in range(images)]
    turns = [Turn("user", IMAGE_PLACEHOLDER * images + prompt), Turn("assistant", answer)]
    return Sample(key, "test", "caption", pictures, turns, {"answer": answer})


def flops_model_config(window: bool = True) -> ModelConfig:
    """A small model with window attention (or none) whose pack_flops tests/test_flops.py holds to torch's FLOP
    counter; the vocabulary is the tiny tokenizer's."""
    vision = VisionConfig(
        hidden_size=32,
        depth=3,
        num_heads=2,
        intermediate_size=48,
        window_size=56 if window else 0,
        fullatt_block_indexes=[1] if window else [],
    )
    llm = LLMConfig(num_kv_heads=1, vocab_size=len(tiny_tokenizer()))
    return ModelConfig(vision=vision, llm=llm, attn_backend="sdpa")
