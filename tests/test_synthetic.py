import dataclasses
import io
import json
import os
import random
import re
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlm_train.data import synthetic
from vlm_train.data.synthetic import (
    COLOURS,
    SHAPES,
    SyntheticConfig,
    caption_text,
    corpus_lines,
    ensure_synthetic_shards,
    render_scene,
)

SMALL = dict(num_train_images=120, num_heldout_images=30, images_per_shard=50)
CAPTION_PART = re.compile(r"an? (\w+) (\w+)")


def small_cfg(tmp_path, **overrides) -> SyntheticConfig:
    return SyntheticConfig(cache_dir=str(tmp_path), **{**SMALL, **overrides})


def read_samples(urls):
    return list(wds.WebDataset(urls, shardshuffle=False))


def caption_objects(caption: str) -> list[tuple[str, str]]:
    parts = CAPTION_PART.findall(caption)
    assert caption == caption_text([{"colour": c, "shape": s} for c, s in parts])
    return parts


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_synthetic_shards(small_cfg(tmp_path_factory.mktemp("cache")))


def test_layout_and_members(shards):
    assert [os.path.basename(u) for u in shards.caption_urls] == [f"train-caption-00000{i}.tar" for i in range(3)]
    assert [os.path.basename(u) for u in shards.grounding_urls] == [f"train-grounding-00000{i}.tar" for i in range(3)]
    assert [os.path.basename(u) for u in shards.heldout_urls] == ["heldout-000000.tar"]
    assert (
        os.path.basename(shards.dir).startswith("synthetic-")
        and len(os.path.basename(shards.dir)) == len("synthetic-") + 12
    )
    for url in shards.train_urls + shards.heldout_urls:
        assert tarfile.is_tarfile(url)
    samples = read_samples(shards.train_urls)
    assert len(samples) == 2 * SMALL["num_train_images"]
    for sample in samples:
        key = sample["__key__"]
        assert re.fullmatch(r"train\d{6}[cg]", key)
        members = set(sample) - {"__key__", "__url__", "__local_path__"}
        assert members == ({"png", "txt"} if key.endswith("c") else {"png", "json"})
        # Each train shard holds one task, so the two tasks can be mixed by weight as two sources.
        assert ("train-caption-" in sample["__url__"]) == key.endswith("c")


def test_caption_and_grounding_twins_agree(shards):
    samples = read_samples(shards.train_urls + shards.heldout_urls)
    by_key = {s["__key__"]: s for s in samples}
    for key, cap in by_key.items():
        if not key.endswith("c"):
            continue
        ground = by_key[key[:-1] + "g"]
        assert cap["png"] == ground["png"]
        image = np.array(Image.open(io.BytesIO(cap["png"])).convert("RGB"))
        height, width = image.shape[:2]
        objects = caption_objects(cap["txt"].decode())
        assert 1 <= len(objects) <= 2 and len(set(objects)) == len(objects)

        meta = json.loads(ground["json"])
        assert meta["task"] == "grounding" and meta["box_format"] == "pixels"
        assert tuple(meta["phrase"].split()) in objects
        x1, y1, x2, y2 = meta["box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert min(x2 - x1, y2 - y1) >= 20

        colours = [c for c, _ in objects]
        if len(set(colours)) == len(colours):
            # Each colour is one object: its pixels give the left-to-right order and the tight box.
            centres = [np.nonzero(colour_mask(image, c))[1].mean() for c in colours]
            assert centres == sorted(centres), cap["txt"]
            ys, xs = np.nonzero(colour_mask(image, meta["phrase"].split()[0]))
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]


def test_all_colours_shapes_and_varied_sizes(shards):
    seen, sizes = set(), set()
    for sample in read_samples(shards.train_urls):
        if "txt" in sample:
            seen.update(caption_objects(sample["txt"].decode()))
            sizes.add(Image.open(io.BytesIO(sample["png"])).size)
    assert {c for c, _ in seen} == set(COLOURS) and len(COLOURS) >= 6
    assert {s for _, s in seen} == set(SHAPES) and len(SHAPES) >= 4
    assert len(seen) >= 20
    widths, heights = {w for w, _ in sizes}, {h for _, h in sizes}
    assert len(widths) > 20 and len(heights) > 20
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.7 and max(aspects) > 1.4


def test_side_step_keeps_sides_on_the_patch_grid_and_varied():
    """The default run's sides are multiples of 28 (never resized by the loader), still in several sizes and
    aspect ratios; a step that does not divide the range stops at max_side."""
    cfg = SyntheticConfig(min_side=56, max_side=112, side_step=28)
    rng = random.Random(5)
    sizes = {render_scene(rng, cfg)[0].size for _ in range(300)}
    assert {w for w, _ in sizes} == {56, 84, 112} and {h for _, h in sizes} == {56, 84, 112}
    assert len(sizes) == 9
    odd = SyntheticConfig(min_side=56, max_side=100, side_step=28)
    assert {render_scene(rng, odd)[0].width for _ in range(100)} == {56, 84}
    with pytest.raises(ValueError, match="side_step"):
        ensure_synthetic_shards(dataclasses.replace(cfg, side_step=0))


def test_render_scene_objects():
    cfg = SyntheticConfig()
    rng = random.Random(3)
    for _ in range(200):
        image, objects = render_scene(rng, cfg)
        assert image.mode == "RGB"
        assert cfg.min_side <= image.width <= cfg.max_side and cfg.min_side <= image.height <= cfg.max_side
        assert 1 <= len(objects) <= cfg.max_objects
        kinds = [(o["colour"], o["shape"]) for o in objects]
        assert len(set(kinds)) == len(kinds)
        for left, right in zip(objects, objects[1:]):
            assert left["box"][2] + 2 <= right["box"][0]  # separated horizontal extents
        background = np.array(image)[0, 0].astype(int)
        # mid-grey near the CLIP mean, so background patches normalise to about zero
        assert np.abs(background - np.array(synthetic.BACKGROUND_MEAN)).max() <= 12


def test_train_and_heldout_differ(shards):
    train = {s["png"] for s in read_samples(shards.train_urls)}
    heldout = {s["png"] for s in read_samples(shards.heldout_urls)}
    assert train.isdisjoint(heldout)


def test_second_call_reuses_cache(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    first = ensure_synthetic_shards(cfg)
    stamps = {p: os.stat(os.path.join(first.dir, p)).st_mtime_ns for p in os.listdir(first.dir)}

    def fail(*args, **kwargs):
        raise AssertionError("cache was rewritten")

    monkeypatch.setattr(synthetic, "_write_split", fail)
    second = ensure_synthetic_shards(SyntheticConfig(cache_dir=str(tmp_path), **SMALL))
    assert second == first
    assert {p: os.stat(os.path.join(first.dir, p)).st_mtime_ns for p in os.listdir(first.dir)} == stamps
    assert os.listdir(tmp_path) == [os.path.basename(first.dir)]  # no temp folders left behind


def test_config_change_gives_new_folder(tmp_path):
    base = small_cfg(tmp_path, num_train_images=10, num_heldout_images=2)
    a = ensure_synthetic_shards(base)
    b = ensure_synthetic_shards(dataclasses.replace(base, seed=1))
    c = ensure_synthetic_shards(dataclasses.replace(base, max_side=100))
    assert len({a.dir, b.dir, c.dir}) == 3
    # cache_dir is where the data lives, not what it is
    assert os.path.basename(
        synthetic.dataset_dir(dataclasses.replace(base, cache_dir="/elsewhere"))
    ) == os.path.basename(a.dir)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = ensure_synthetic_shards(small_cfg(tmp_path / "a"))
    b = ensure_synthetic_shards(small_cfg(tmp_path / "b"))
    assert [os.path.basename(u) for u in a.train_urls + a.heldout_urls] == [
        os.path.basename(u) for u in b.train_urls + b.heldout_urls
    ]
    for ua, ub in zip(a.train_urls + a.heldout_urls, b.train_urls + b.heldout_urls):
        with open(ua, "rb") as fa, open(ub, "rb") as fb:
            assert fa.read() == fb.read()


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_TRAIN_CACHE", str(tmp_path / "env"))
    out = ensure_synthetic_shards(SyntheticConfig(num_train_images=4, num_heldout_images=2))
    assert out.dir.startswith(str(tmp_path / "env"))


def test_another_process_finishing_first_wins(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, num_train_images=4, num_heldout_images=2)
    final = synthetic.dataset_dir(cfg)
    real_write = synthetic._write_split

    def racing_write(folder, split, num_images, cfg_):
        real_write(folder, split, num_images, cfg_)
        if split == "heldout":  # the other process renames its folder into place meanwhile
            os.makedirs(final)
            with open(os.path.join(final, synthetic.MARKER), "w") as f:
                f.write("{}")

    monkeypatch.setattr(synthetic, "_write_split", racing_write)
    out = ensure_synthetic_shards(cfg)
    assert out.dir == final
    assert os.listdir(tmp_path) == [os.path.basename(final)]  # our temp folder was removed


def test_invalid_config_raises(tmp_path):
    with pytest.raises(ValueError, match="min_side"):
        ensure_synthetic_shards(small_cfg(tmp_path, min_side=200, max_side=100))
    with pytest.raises(ValueError, match="max_objects"):
        ensure_synthetic_shards(small_cfg(tmp_path, max_objects=0))


def test_generation_logs(tmp_path, caplog):
    caplog.set_level("INFO", logger="vlm_train.data.synthetic")
    ensure_synthetic_shards(small_cfg(tmp_path, num_train_images=4, num_heldout_images=2))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("generating synthetic dataset") for m in messages)
    assert any(m.startswith("wrote synthetic dataset in") for m in messages)


def test_corpus_covers_all_text(shards):
    words = set(" ".join(corpus_lines()).split())
    chars = set("".join(corpus_lines()))
    for sample in read_samples(shards.train_urls):
        if "txt" in sample:
            assert set(sample["txt"].decode().split()) <= words
        else:
            meta = json.loads(sample["json"])
            assert set(synthetic.grounding_prompt(meta["phrase"]).split()) <= words
    assert set(synthetic.CAPTION_PROMPT.split()) <= words
    assert set("0123456789(),") <= chars
