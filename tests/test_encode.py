import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample
from vlm_train.data.formats import Sample, Turn

from helpers import encoder, sample, tiny_tokenizer


def test_labels_are_shifted_and_cover_only_the_answer():
    enc = encoder()
    encoded = enc.encode(sample("k", "a red circle"))
    supervised = np.flatnonzero(encoded.labels != IGNORE_INDEX)
    # Each supervised position predicts the next token, and the targets spell the answer then <|im_end|>.
    assert np.array_equal(encoded.labels[supervised], encoded.input_ids[supervised + 1])
    assert tiny_tokenizer().decode(encoded.labels[supervised]) == "a red circle<|im_end|>"
    assert encoded.labels[-1] == IGNORE_INDEX  # the last token predicts nothing across the sample boundary


def test_image_tokens_match_the_grid_and_generation_prompt_ends_at_assistant():
    enc = encoder()
    encoded = enc.encode(sample("k", "x", images=2))
    grids = encoded.image_grid_thw
    expected_pads = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum()) // 4
    assert int((encoded.input_ids == enc.special.image_pad).sum()) == expected_pads
    assert encoded.num_patches == int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
    prompt = enc.encode(sample("k", "x", images=2), for_generation=True)
    assert tiny_tokenizer().decode(prompt.input_ids[-3:]).endswith("<|im_start|>assistant\n")
    assert (prompt.labels == IGNORE_INDEX).all()


def test_placeholder_count_mismatch_is_skipped():
    bad = sample("k", "x", images=2)
    bad.images = bad.images[:1]
    with pytest.raises(SkipSample) as err:
        encoder().encode(bad)
    assert err.value.reason == "image_count_mismatch"


def test_mrope_positions_equal_transformers_get_rope_index():
    enc = encoder()
    encoded = enc.encode(sample("k", "a blue square and a red circle", images=2))
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
            "vocab_size": len(tiny_tokenizer()),
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        },
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "out_hidden_size": 32},
        image_token_id=enc.special.image_pad,
        vision_start_token_id=enc.special.vision_start,
    )
    model = Qwen2_5_VLModel(config)
    input_ids = torch.from_numpy(encoded.input_ids)[None]
    mm_types = (input_ids == enc.special.image_pad).int()
    positions, _ = model.get_rope_index(input_ids, mm_types, image_grid_thw=torch.from_numpy(encoded.image_grid_thw))
    assert torch.equal(positions[:, 0], torch.from_numpy(encoded.position_ids))


def test_text_only_sample_positions_count_up_from_zero():
    text_only = Sample("t", "test", "text", [], [Turn("user", "hello"), Turn("assistant", "a red circle")])
    encoded = encoder().encode(text_only)
    assert encoded.num_patches == 0 and encoded.image_grid_thw.shape == (0, 3)
    assert np.array_equal(encoded.position_ids, np.tile(np.arange(encoded.num_tokens), (3, 1)))


def test_an_extreme_aspect_ratio_is_a_counted_skip():
    from helpers import noise_image

    strip = sample("k", "x")
    strip.images = [noise_image(3000, 10)]
    with pytest.raises(SkipSample) as err:
        encoder().encode(strip)
    assert err.value.reason == "bad_image_size"
