"""Every sample format, read from shards the tests write, through the loader's decode and encode."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample
from vlm_train.data.formats import parse_sample
from vlm_train.data.tar_reader import iter_shard

from helpers import encoder, noise_image, tiny_tokenizer


def _jpg(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(width, height, seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _shard(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _read_all(url: str, fmt: str = "auto"):
    """Every sample of the shard through decode and encode, as the loader does: key -> (meta, ids, labels),
    and the skip counters."""
    samples, skipped = {}, Counter()
    for raw in iter_shard(url):
        try:
            encoded = encoder().encode(parse_sample(raw, "src", 10**7, fmt))
        except SkipSample as exc:
            skipped[f"src/{exc.reason}"] += 1
            continue
        samples[encoded.meta["key"]] = (encoded.meta, encoded.input_ids, encoded.labels)
    return samples, dict(skipped)


def _supervised_text(ids: np.ndarray, labels: np.ndarray) -> str:
    return tiny_tokenizer().decode(labels[labels != IGNORE_INDEX])


def test_img2dataset_caption_layout_reads_as_is(tmp_path):
    record = {
        "caption": "a red circle",
        "url": "http://x/1.jpg",
        "key": "000000001",
        "status": "success",
        "width": 96,
        "height": 64,
        "original_width": 400,
        "original_height": 300,
    }
    url = _shard(
        tmp_path / "caption.tar",
        [
            {"__key__": "000000001", "jpg": _jpg(96, 64), "txt": "a red circle", "json": json.dumps(record)},
            {
                "__key__": "000000002",
                "jpg": _jpg(64, 64, 1),
                "json": json.dumps({**record, "caption": "a blue square"}),
            },
            {"__key__": "000000003", "webp": _jpg(64, 64, 2), "txt": "a green diamond"},
        ],
    )
    samples, skipped = _read_all(url)
    assert {k: m["answer"] for k, (m, _, _) in samples.items()} == {
        "000000001": "a red circle",
        "000000002": "a blue square",
        "000000003": "a green diamond",
    }
    assert not skipped
    meta, ids, labels = samples["000000001"]
    assert meta["task"] == "caption" and _supervised_text(ids, labels) == "a red circle<|im_end|>"


def test_conversation_with_several_images_in_placeholder_order_and_loss_on_answers_only(tmp_path):
    conv = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is left?"},
            {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "And in <image>?"},
            {"from": "gpt", "value": "a blue square"},
        ]
    }
    # Image 0 is wide, image 1 tall, so their grids tell which came first.
    url = _shard(
        tmp_path / "conv.tar",
        [{"__key__": "c1", "0.jpg": _jpg(112, 56), "1.jpg": _jpg(56, 112, 1), "json": json.dumps(conv)}],
    )
    samples, skipped = _read_all(url)
    meta, ids, labels = samples["c1"]
    assert meta["task"] == "conversation" and not skipped
    assert _supervised_text(ids, labels) == "a red circle<|im_end|>a blue square<|im_end|>"
    sample = parse_sample(
        {"__key__": "c1", "0.jpg": _jpg(112, 56), "1.jpg": _jpg(56, 112, 1), "json": json.dumps(conv).encode()},
        "src",
        10**6,
    )
    encoded = encoder().encode(sample)
    assert encoded.image_grid_thw.tolist() == [[1, 4, 8], [1, 8, 4]]
    text = tiny_tokenizer().decode(encoded.input_ids)
    assert text.index("What is left?") < text.index("And in") and text.count("<|vision_start|>") == 2


@pytest.mark.parametrize(
    "record,reason",
    [
        (
            {"conversations": [{"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "x"}]},
            "image_count_mismatch",
        ),
        (
            {"conversations": [{"from": "robot", "value": "<image>hi"}, {"from": "gpt", "value": "x"}]},
            "bad_conversation",
        ),
        ({"conversations": [{"from": "human", "value": "<image>hi"}]}, "bad_conversation"),
        ({"conversations": "nope"}, "bad_conversation"),
    ],
)
def test_malformed_conversations_are_skipped_with_reasons(record, reason):
    with pytest.raises(SkipSample) as err:
        parse_sample({"__key__": "k", "jpg": _jpg(56, 56), "json": json.dumps(record).encode()}, "src", 10**6)
    assert err.value.reason == reason


def test_conversation_faults_are_counted_through_the_loader(tmp_path):
    good = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a red circle"}]}
    url = _shard(
        tmp_path / "faults.tar",
        [
            {"__key__": "ok", "jpg": _jpg(56, 56), "json": json.dumps(good)},
            {"__key__": "two", "0.jpg": _jpg(56, 56), "1.jpg": _jpg(56, 56), "json": json.dumps(good)},
            {"__key__": "nojson", "jpg": _jpg(56, 56)},
            {"__key__": "broken", "jpg": _jpg(56, 56), "json": b'{"conversations": ['},
            {"__key__": "truncated", "jpg": _jpg(56, 56)[:200], "json": json.dumps(good)},
        ],
    )
    samples, skipped = _read_all(url, fmt="conversation")
    assert set(samples) == {"ok"}
    assert skipped == {"src/image_count_mismatch": 1, "src/missing_json": 1, "src/bad_json": 1, "src/corrupt_image": 1}


def test_grounding_in_pixels_or_normalised_gives_the_same_resize_invariant_text(tmp_path):
    box_px = [20, 10, 120, 90]
    url = _shard(
        tmp_path / "ground.tar",
        [
            {"__key__": "px", "png": _jpg(200, 100), "json": json.dumps({"phrase": "red circle", "box": box_px})},
            {
                "__key__": "px2",
                "png": _jpg(400, 200),
                "json": json.dumps({"phrase": "red circle", "box": [2 * v for v in box_px]}),
            },
            {
                "__key__": "norm",
                "png": _jpg(200, 100),
                "json": json.dumps({"phrase": "red circle", "box": [0.1, 0.1, 0.6, 0.9], "box_format": "normalized"}),
            },
            {
                "__key__": "pts",
                "png": _jpg(200, 100),
                "json": json.dumps({"phrase": "red circle", "points": [[20, 10], [200, 100]]}),
            },
            {"__key__": "out", "png": _jpg(200, 100), "json": json.dumps({"phrase": "x", "box": [0, 0, 300, 50]})},
        ],
    )
    samples, skipped = _read_all(url)
    answers = {k: m["answer"] for k, (m, _, _) in samples.items()}
    assert answers == {
        "px": "(100,100),(599,899)",
        "px2": "(100,100),(599,899)",
        "norm": "(100,100),(599,899)",
        "pts": "(100,100);(999,999)",
    }
    assert skipped == {"src/bad_grounding": 1}
    tokens = tiny_tokenizer().convert_ids_to_tokens(tiny_tokenizer().encode("(100,100)", add_special_tokens=False))
    assert [t for t in tokens if t.isdigit()] == ["1", "0", "0", "1", "0", "0"]  # three tokens per number


def test_box_and_point_tags_in_conversations_become_relative_text():
    conv = {
        "box_format": "pixels",
        "conversations": [
            {"from": "human", "value": "<image>Where is the dog?"},
            {"from": "gpt", "value": "At <box>[20, 10, 120, 90]</box>, nose at <point>[100, 50]</point>."},
        ],
    }
    sample = parse_sample({"__key__": "k", "jpg": _jpg(200, 100), "json": json.dumps(conv).encode()}, "s", 10**6)
    assert sample.turns[-1].text == "At (100,100),(599,899), nose at (500,500)."


def test_text_only_samples_learn_every_token_and_carry_no_image(tmp_path):
    url = _shard(
        tmp_path / "text.tar",
        [
            {"__key__": "doc", "json": json.dumps({"text": "a red circle and a blue square"})},
            {
                "__key__": "chat",
                "json": json.dumps(
                    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a red circle"}]}
                ),
            },
        ],
    )
    samples, skipped = _read_all(url)
    assert not skipped and samples["doc"][0]["task"] == "text" and samples["chat"][0]["task"] == "conversation"
    _, ids, labels = samples["doc"]
    assert _supervised_text(ids, labels) == " red circle and a blue square<|endoftext|>"  # all but the first
    assert not (ids == encoder().special.image_pad).any()
    plain = _shard(tmp_path / "plain.tar", [{"__key__": "p", "txt": "a green diamond"}])
    samples, _ = _read_all(plain, fmt="text")
    assert samples["p"][0]["task"] == "text"


def test_image_member_ambiguity_is_a_counted_skip():
    raw = {"__key__": "k", "jpg": _jpg(56, 56), "0.jpg": _jpg(56, 56), "txt": b"x"}
    with pytest.raises(SkipSample, match="ambiguous_images"):
        parse_sample(raw, "s", 10**6)
    conv = {"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]}
    raw = {"__key__": "k", "0.jpg": _jpg(56, 56), "2.jpg": _jpg(56, 56), "json": json.dumps(conv).encode()}
    with pytest.raises(SkipSample, match="ambiguous_images"):
        parse_sample(raw, "s", 10**6)


def test_a_json_labels_list_travels_in_the_sample_meta_and_other_values_do_not(tmp_path):
    url = _shard(
        tmp_path / "labels.tar",
        [
            {"__key__": "a", "jpg": _jpg(56, 56), "json": json.dumps({"caption": "a red ring", "labels": ["red"]})},
            {"__key__": "b", "jpg": _jpg(56, 56), "json": json.dumps({"caption": "a red ring", "labels": "red"})},
            {"__key__": "c", "jpg": _jpg(56, 56), "json": json.dumps({"caption": "a red ring", "labels": [1, 2]})},
        ],
    )
    samples, skipped = _read_all(url)
    assert not skipped
    assert samples["a"][0]["labels"] == ["red"]
    assert "labels" not in samples["b"][0] and "labels" not in samples["c"][0]
