"""MMC4 documents as published (`text_list` + `image_info`, images as tar members named by `image_name`) and as
OpenFlamingo's MMC4 shards hold them (`image_base64` inline), read from real webdataset shards through the loader:
each image right after its `matched_text_index` sentence, loss on text only, counted skips, long documents split
into parts that resume exactly."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, parse_sample
from vlm_train.data.loader import PackedStream
from vlm_train.data.sources import Source

from helpers import SPEC, noise_image, tiny_tokenizer

SENTENCES = [
    "the red circle moves left.",
    "a blue square stays on the right.",
    "the green ring is large.",
    "a small cross is near the triangle.",
]
# image_info in its published order: (image_name, matched_text_index, (width, height)); two images match sentence 2
IMAGES = [("B9040a0dbb22.jpg", 2, (56, 56)), ("db1c21bc8474.jpg", 0, (84, 56)), ("0c1d2e3f4a5b.png", 2, (56, 84))]
# Sentence 0, its image; sentence 1; sentence 2 and its two images in image_info order; sentence 3. Images are
# written by their patch grid (rows x columns of 14 px patches): 84x56 -> 4x6, 56x56 -> 4x4, 56x84 -> 6x4.
# Sentences in a row are joined by a space; an image sits directly between its neighbours.
EXPECTED = (
    "the red circle moves left.<image 4x6>a blue square stays on the right. the green ring is large."
    "<image 4x4><image 6x4>a small cross is near the triangle.<|endoftext|>"
)


def _image(width: int, height: int, seed: int, name: str) -> bytes:
    out = io.BytesIO()
    noise_image(width, height, seed).save(out, format="PNG" if name.endswith(".png") else "JPEG")
    return out.getvalue()


def mmc4_row(
    key: str,
    sentences: list[str] = SENTENCES,
    images: list[tuple[str, int, tuple[int, int]]] = IMAGES,
    inline: bool = False,
    drop: str | None = None,
) -> dict:
    """A webdataset sample of one MMC4 document, with every field of the published rows; images as members
    `key.<image_name>`, or inline as base64 (`inline`, OpenFlamingo's shards: the json member alone)."""
    sample, infos = {"__key__": key}, []
    for n, (name, index, (width, height)) in enumerate(images):
        info = {
            "image_name": name,
            "raw_url": f"http://example.com/pics/{name}",
            "matched_text_index": index,
            "matched_sim": 0.3 + 0.01 * n,
            "face_detections": None,
        }
        data = _image(width, height, n, name)
        if inline:
            info["image_base64"] = base64.b64encode(data).decode("ascii")
        elif name != drop:
            sample[name] = data
        infos.append(info)
    record = {
        "text_list": sentences,
        "image_info": infos,
        "similarity_matrix": [[0.2] * len(sentences) for _ in images],
        "url": f"http://example.com/{key}.html",
        "could_have_url_duplicate": 0,
    }
    sample["json"] = json.dumps(record).encode()
    return sample


def _shard(path, rows: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for row in rows:
            writer.write(row)
    return str(path)


def _stream(url: str, cfg: DataConfig, fmt: str = "auto"):
    return PackedStream([Source("web", [url], format=fmt)], Encoder(tiny_tokenizer(), SPEC), cfg, 0, 0, 1).slot_stream(
        0, 1
    )


def _documents(batch) -> list[tuple[dict, str, list[int], list[int]]]:
    """Per sample of a pack: its meta, its tokens as text with each image run written `<image RxC>`, and its ids
    and labels."""
    tokenizer, special = tiny_tokenizer(), Encoder(tiny_tokenizer(), SPEC).special
    grids = iter(batch.image_grid_thw.tolist())
    bounds = batch.cu_seqlens.tolist()
    out = []
    for n, meta in enumerate(batch.meta):
        ids = batch.input_ids[bounds[n] : bounds[n + 1]].tolist()
        labels = batch.labels[bounds[n] : bounds[n + 1]].tolist()
        text = tokenizer.decode(ids)
        runs = re.findall(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>", text)
        for run in runs:
            _, rows, cols = next(grids)
            assert run.count("<|image_pad|>") == rows * cols // SPEC.merge_size**2
            text = text.replace(run, f"<image {rows}x{cols}>", 1)
        out.append((meta, text, ids, labels))
        assert special.image_pad not in ids or runs
    return out


def _loss_only_on_text(ids: list[int], labels: list[int]) -> None:
    """Each label is the next token, except where that token is an image's (vision start, pads, vision end) and at
    the document's last position: no loss there."""
    special = Encoder(tiny_tokenizer(), SPEC).special
    image_tokens = {special.vision_start, special.image_pad, special.vision_end}
    for i, label in enumerate(labels):
        if i + 1 == len(ids) or ids[i + 1] in image_tokens:
            assert label == IGNORE_INDEX, (i, ids[i + 1 : i + 2])
        else:
            assert label == ids[i + 1], (i, label, ids[i + 1])


def test_mmc4_rows_with_member_and_inline_images_read_through_the_loader(tmp_path):
    url = _shard(tmp_path / "mmc4.tar", [mmc4_row("members"), mmc4_row("inline", inline=True)])
    cfg = DataConfig(shuffle_buffer=1)
    cfg.pack.llm_budget, cfg.pack.buffer_size = 200, 1
    stream = _stream(url, cfg)
    seen = {}
    for _ in range(4):
        for meta, text, ids, labels in _documents(stream.next_pack()):
            seen[meta["key"]] = text
            _loss_only_on_text(ids, labels)
            assert meta["format"] == "interleaved" and meta["task"] == "text"
    assert seen == {"members": EXPECTED, "inline": EXPECTED}
    assert stream.skipped == Counter()


def test_the_parsed_document_keeps_sentences_in_order_and_images_after_theirs():
    sample = parse_sample(mmc4_row("doc"), "web", 10**8)  # format auto knows the layout
    assert sample.meta["entries"] == [SENTENCES[0], 0, SENTENCES[1], SENTENCES[2], 1, 2, SENTENCES[3]]
    assert [image.size for image in sample.images] == [(84, 56), (56, 56), (56, 84)]
    (turn,) = sample.turns
    placeholder = IMAGE_PLACEHOLDER
    assert turn.role == "text" and turn.text == (
        f"{SENTENCES[0]}{placeholder}{SENTENCES[1]} {SENTENCES[2]}{placeholder}{placeholder}{SENTENCES[3]}"
    )
    assert sample.meta["answer"] == " ".join(SENTENCES)
    inline = parse_sample(mmc4_row("doc", inline=True), "web", 10**8, "interleaved")
    assert inline.meta["entries"] == sample.meta["entries"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(inline.images, sample.images))


@pytest.mark.parametrize("index", [4, -1, True, "2", None, 1.0])
def test_a_matched_text_index_outside_text_list_is_a_counted_skip(index):
    images = [(IMAGES[0][0], index, (56, 56))]
    with pytest.raises(SkipSample) as info:
        parse_sample(mmc4_row("doc", images=images), "web", 10**8)
    assert info.value.reason == "bad_matched_text_index" and "matched_text_index" in str(info.value)


def test_missing_and_broken_images_are_counted_skips():
    with pytest.raises(SkipSample) as info:
        parse_sample(mmc4_row("doc", drop=IMAGES[1][0]), "web", 10**8)
    assert info.value.reason == "missing_image" and IMAGES[1][0] in str(info.value)
    row = mmc4_row("doc", inline=True)
    record = json.loads(row["json"])
    record["image_info"][0]["image_base64"] = "not base64!"
    with pytest.raises(SkipSample) as info:
        parse_sample({**row, "json": json.dumps(record).encode()}, "web", 10**8)
    assert info.value.reason == "corrupt_image"
    with pytest.raises(SkipSample) as info:
        parse_sample(mmc4_row("doc", sentences=["", "  "], images=[]), "web", 10**8)
    assert info.value.reason == "empty_text"


def test_the_loader_counts_mmc4_skips_and_packs_only_good_documents(tmp_path):
    rows = [
        mmc4_row("missing", drop=IMAGES[0][0]),
        mmc4_row("good"),
        mmc4_row("bad_index", images=[(IMAGES[0][0], len(SENTENCES), (56, 56))]),
    ]
    url = _shard(tmp_path / "mmc4.tar", rows)
    cfg = DataConfig(shuffle_buffer=1)
    cfg.pack.llm_budget, cfg.pack.buffer_size = 200, 1
    stream = _stream(url, cfg)
    keys = [meta["key"] for _ in range(3) for meta in stream.next_pack().meta]
    assert set(keys) == {"good"}
    skipped = stream.skipped
    assert set(skipped) == {"web/missing_image", "web/bad_matched_text_index"}
    # one of each for every pass over the shard
    assert (
        skipped["web/missing_image"] >= 1
        and abs(skipped["web/missing_image"] - skipped["web/bad_matched_text_index"]) <= 1
    )


LONG = [f"sentence {i} says the red circle moves left and the blue square stays." for i in range(12)]
LONG_MATCHES = [0, 3, 3, 7, 11]  # image n goes after sentence LONG_MATCHES[n]; it is 56 or 84 px wide


def _long_document(key: str, inline: bool = False) -> dict:
    images = [(f"{key}{n:03d}.jpg", index, (56 + 28 * (n % 2), 56)) for n, index in enumerate(LONG_MATCHES)]
    return mmc4_row(key, LONG, images, inline=inline)


def _render(entries: list, first_image: int) -> str:
    """The text a part of the long document should decode to: sentences joined by a space, images in place."""
    text = ""
    for i, entry in enumerate(entries):
        if isinstance(entry, int):
            text += f"<image 4x{4 + 2 * ((first_image + entry) % 2)}>"
        else:
            text += (" " if i and isinstance(entries[i - 1], str) else "") + entry
    return text + "<|endoftext|>"


def test_a_long_mmc4_document_is_split_into_parts_that_fit_and_resume_exactly(tmp_path):
    url = _shard(tmp_path / "long.tar", [_long_document(f"doc{n}", inline=n % 2 == 1) for n in range(4)])
    cfg = DataConfig(shuffle_buffer=2)
    cfg.pack.llm_budget, cfg.pack.vit_budget, cfg.pack.buffer_size = 160, 4096, 3
    first = _stream(url, cfg, "interleaved")
    packs = [first.next_pack() for _ in range(3)]
    state = first.state_dict()
    expected = [first.next_pack() for _ in range(4)]
    assert all(p.num_tokens <= 160 for p in packs + expected) and first.skipped == Counter()
    parts: dict[tuple[str, int], dict[int, tuple[list, str]]] = {}
    for pack in packs + expected:
        for meta, text, ids, labels in _documents(pack):
            _loss_only_on_text(ids, labels)
            key = (meta["key"].split("#")[0], meta["restore_key"]["epoch"])
            parts.setdefault(key, {})[meta["restore_key"]["part"]] = (meta["entries"], text)
    # A document whose parts all reached the packs: together they hold its entries once each, in order (the cuts
    # fall between entries, an image stays whole after its sentence), and each part decodes to its own entries.
    whole = {key: p for key, p in parts.items() if sorted(p) == list(range(len(p))) and len(p) > 1}
    complete = 0
    for by_part in whole.values():
        sequence, images = [], 0
        for n in sorted(by_part):
            entries, text = by_part[n]
            assert text == _render(entries, images)
            sequence += ["image" if isinstance(e, int) else e for e in entries]
            images += sum(isinstance(e, int) for e in entries)
        want = []
        for i, sentence in enumerate(LONG):
            want += [sentence] + ["image"] * LONG_MATCHES.count(i)
        if len(sequence) == len(want):
            assert sequence == want
            complete += 1
    assert complete >= 1
    resumed = _stream(url, cfg, "interleaved")
    resumed.load_state_dict(state)
    for want_pack in expected:
        got = resumed.next_pack()
        assert torch.equal(got.input_ids, want_pack.input_ids) and got.meta == want_pack.meta
