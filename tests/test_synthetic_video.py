"""The built-in synthetic video set: real H.264 clips of shapes moving left, right, up or down, cached like the
image set, with captions the video shard format reads, and a tokenizer that changes only for runs that use it."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re

import av
import numpy as np
import pytest
import webdataset as wds

from vlm_train.cli.evaluate import main as evaluate_main
from vlm_train.data import synthetic_video as sv
from vlm_train.data.config import DataConfig, tokenizer_corpus
from vlm_train.data.formats import VIDEO_PLACEHOLDER, parse_sample
from vlm_train.data.synthetic import COLOURS, SHAPES, corpus_lines
from vlm_train.data.synthetic_video import (
    DIRECTIONS,
    SyntheticVideoConfig,
    caption_objects,
    caption_text,
    ensure_synthetic_video_shards,
    parse_caption,
    render_clip,
)
from vlm_train.data.tokenizer import load_tokenizer
from vlm_train.data.video import VideoConfig, decode_video
from vlm_train.train.builders import build_data
from vlm_train.train.caption_attributes import attribute_scores
from vlm_train.train.trainer import run

from conftest import make_config

SMALL = dict(num_train_clips=40, num_heldout_clips=12, clips_per_shard=16)
# data.video as conf/data/synthetic_video.yaml sets it: every frame at its own size.
DEFAULT = SyntheticVideoConfig()
FRAMES, HEIGHT, WIDTH = DEFAULT.frames, DEFAULT.height, DEFAULT.width
KEEP_ALL = VideoConfig(fps=DEFAULT.fps, min_frames=4, min_pixels=56 * 56, max_pixels=HEIGHT * WIDTH)
FACTOR = 28  # patch_size * merge_size of the tiny model
TOLERANCE = 32  # per-channel distance to a shape's colour: under half the distance between any two colours
REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up"}


def redirected(caption: str, directions: dict[str, str]) -> str:
    """The caption with each object's direction d replaced by directions[d]."""
    return re.sub(r"moving (\w+)", lambda m: f"moving {directions[m[1]]}", caption)


def small_cfg(tmp_path, **overrides) -> SyntheticVideoConfig:
    return SyntheticVideoConfig(cache_dir=str(tmp_path), **{**SMALL, **overrides})


def read_samples(urls):
    return list(wds.WebDataset(urls, shardshuffle=False))


def centroids(frames: np.ndarray, colour: str) -> np.ndarray:
    """(x, y) centre of the pixels near `colour` on each frame: [T, 2]."""
    near = np.abs(frames.astype(int) - np.array(COLOURS[colour])).max(axis=-1) <= TOLERANCE
    assert near.reshape(len(frames), -1).sum(axis=1).min() >= 8, f"{colour} shape lost in the decoded frames"
    return np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(m) for m in near)])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_synthetic_video_shards(small_cfg(tmp_path_factory.mktemp("cache")))


def test_layout_members_and_real_h264(shards):
    assert [os.path.basename(u) for u in shards.caption_urls] == [f"train-00000{i}.tar" for i in range(3)]
    assert [os.path.basename(u) for u in shards.heldout_urls] == ["heldout-000000.tar"]
    assert os.path.basename(shards.dir).startswith("synthetic-video-")
    samples = read_samples(shards.caption_urls)
    assert len(samples) == SMALL["num_train_clips"]
    for sample in samples:
        assert re.fullmatch(r"train\d{6}", sample["__key__"])
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"mp4", "txt", "json"}
        with av.open(io.BytesIO(sample["mp4"])) as container:
            stream = container.streams.video[0]
            assert container.format.name.startswith("mov,mp4") and stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p" and (stream.width, stream.height) == (WIDTH, HEIGHT)


def test_clips_decode_to_every_frame_and_shapes_move_as_captioned(shards):
    """Decoded as training decodes them, every clip keeps all its frames at its size, and each shape whose colour is
    its own moves in the captioned direction by its speed at each new place, held for `hold_frames` frames (the
    colour's centroid, measured)."""
    checked = 0
    for sample in read_samples(shards.caption_urls + shards.heldout_urls):
        video = decode_video(sample["mp4"], KEEP_ALL, FACTOR)
        assert video.frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and video.sample_fps == pytest.approx(DEFAULT.fps)
        meta = json.loads(sample["json"])
        objects = meta["objects"]
        assert meta["clip"] == {"width": WIDTH, "height": HEIGHT, "frames": FRAMES, "fps": DEFAULT.fps}
        colours = [o["colour"] for o in objects]
        for obj in objects:
            if colours.count(obj["colour"]) > 1:
                continue  # two shapes of one colour: their pixels cannot be told apart by colour
            path = centroids(video.frames, obj["colour"])
            unit = np.array(DIRECTIONS[obj["direction"]])
            along, across = np.diff(path, axis=0) @ unit, np.diff(path, axis=0) @ unit[::-1]  # per frame
            # yuv420p keeps colour at 2-px resolution: a thin ring's step of 5 px can read as 3.2 or 6.8, but every
            # step goes the captioned way, nothing moves across it, and the whole path is right within 2 px.
            moves = np.array([(t + 1) // DEFAULT.hold_frames != t // DEFAULT.hold_frames for t in range(FRAMES - 1)])
            assert (np.abs(along - obj["speed"] * moves) < 2).all(), (sample["txt"], path)
            assert (np.abs(across) <= 1).all(), (sample["txt"], path)
            assert abs(path[-1] @ unit - path[0] @ unit - obj["speed"] * moves.sum()) < 2, (sample["txt"], path)
            checked += 1
    assert checked >= 40


def test_captions_attributes_and_order_agree(shards):
    seen = set()
    for sample in read_samples(shards.caption_urls + shards.heldout_urls):
        caption = sample["txt"].decode()
        objects = json.loads(sample["json"])["objects"]
        assert caption == caption_text(objects)
        assert parse_caption(caption) == [{k: o[k] for k in ("colour", "shape", "direction")} for o in objects]
        assert 1 <= len(objects) <= 2 and len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        centres = [o["start"][0] + o["side"] / 2 for o in objects]
        assert centres == sorted(centres)  # left to right, as the caption names them
        seen.update(o["direction"] for o in objects)
    assert seen == set(DIRECTIONS)


def test_render_keeps_shapes_inside_apart_and_ordered():
    cfg = SyntheticVideoConfig()
    rng = random.Random(7)
    counts = {1: 0, 2: 0}
    for _ in range(300):
        frames, objects = render_clip(rng, cfg)
        assert len(frames) == cfg.frames and frames[0].shape == (cfg.height, cfg.width, 3)
        counts[len(objects)] += 1
        for obj in objects:
            assert cfg.min_object_px <= obj["side"] <= cfg.max_object_px
            assert cfg.min_speed <= obj["speed"] <= cfg.max_speed
            x0, y0, x1, y1 = sv._swept_box(obj, sv.positions(cfg))
            assert x0 >= sv.MARGIN_PX and y0 >= sv.MARGIN_PX
            assert x1 <= cfg.width - sv.MARGIN_PX and y1 <= cfg.height - sv.MARGIN_PX
        if len(objects) == 2:
            a, b = objects
            for t in (0, sv.positions(cfg) - 1):  # the same left-to-right order, clearly apart, first to last place
                assert sv._centre_x(b, t) - sv._centre_x(a, t) >= sv.MIN_ORDER_GAP_PX
    assert min(counts.values()) > 100  # both one- and two-shape clips are common


def test_shards_parse_as_video_caption_samples(shards):
    """The shard layout is the video caption format: one <video> and the caption as the answer."""
    raw = read_samples(shards.heldout_urls)[0]
    sample = parse_sample(raw, "shapes_video", 10**8, video=KEEP_ALL, factor=FACTOR)
    assert sample.task == "caption" and not sample.images and len(sample.videos) == 1
    assert sample.turns[0].text.startswith(VIDEO_PLACEHOLDER) and sample.turns[1].text == raw["txt"].decode()
    assert sample.meta["answer"] == raw["txt"].decode() and sample.videos[0].frames.shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_second_call_reuses_cache(tmp_path, monkeypatch):
    first = ensure_synthetic_video_shards(small_cfg(tmp_path, num_train_clips=6, num_heldout_clips=2))
    stamps = {p: os.stat(os.path.join(first.dir, p)).st_mtime_ns for p in os.listdir(first.dir)}

    def fail(*args, **kwargs):
        raise AssertionError("cache was rewritten")

    monkeypatch.setattr(sv, "_write_split", fail)
    second = ensure_synthetic_video_shards(small_cfg(tmp_path, num_train_clips=6, num_heldout_clips=2))
    assert second == first
    assert {p: os.stat(os.path.join(first.dir, p)).st_mtime_ns for p in os.listdir(first.dir)} == stamps
    assert os.listdir(tmp_path) == [os.path.basename(first.dir)]  # no temp folders left behind
    # a different config is a different folder; where the cache is is not part of what it is
    cfg = small_cfg(tmp_path)
    assert sv.dataset_dir(dataclasses.replace(cfg, seed=1)) != sv.dataset_dir(cfg)
    moved = sv.dataset_dir(dataclasses.replace(cfg, cache_dir="/elsewhere"))
    assert os.path.basename(moved) == os.path.basename(sv.dataset_dir(cfg))


def test_same_seed_gives_identical_bytes(tmp_path):
    a = ensure_synthetic_video_shards(small_cfg(tmp_path / "a", num_train_clips=5, num_heldout_clips=2))
    b = ensure_synthetic_video_shards(small_cfg(tmp_path / "b", num_train_clips=5, num_heldout_clips=2))
    for ua, ub in zip(a.caption_urls + a.heldout_urls, b.caption_urls + b.heldout_urls, strict=True):
        with open(ua, "rb") as fa, open(ub, "rb") as fb:
            assert fa.read() == fb.read()


def test_encoding_processes_write_the_same_bytes_as_one(tmp_path, monkeypatch):
    # Chunks of 3 clips, at most 2 in flight: 12 clips in 4 chunks over 3 shards, so the order is kept across
    # chunks, shards and splits.
    monkeypatch.setattr(sv, "ENCODE_CHUNK", 3)
    monkeypatch.setattr(sv, "MAX_IN_FLIGHT", 2)
    cfg = small_cfg(tmp_path, num_train_clips=12, num_heldout_clips=4, clips_per_shard=5)
    one, two = tmp_path / "one", tmp_path / "two"
    sv._generate(cfg, str(one), workers=1)
    sv._generate(cfg, str(two), workers=2)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len([n for n in names if n.endswith(".tar")]) == 4
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert len(read_samples(sorted(str(p) for p in two.glob("train-*.tar")))) == 12


def test_heldout_split_is_disjoint_from_train(shards):
    train = read_samples(shards.caption_urls)
    heldout = read_samples(shards.heldout_urls)
    assert len(heldout) == SMALL["num_heldout_clips"]
    assert {s["__key__"] for s in train}.isdisjoint(s["__key__"] for s in heldout)
    assert {s["mp4"] for s in train}.isdisjoint(s["mp4"] for s in heldout)
    # nor the same clip drawn again: same shapes, directions, speeds and starts
    assert {s["json"] for s in train}.isdisjoint(s["json"] for s in heldout)


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        ensure_synthetic_video_shards(small_cfg(tmp_path, width=85))
    moving = dict(frames=6, hold_frames=1, min_speed=4, max_speed=6, min_object_px=28, max_object_px=36)
    with pytest.raises(ValueError, match="needs 70 px"):  # 36 + 5 moves of 6 + 2 margins of 2
        ensure_synthetic_video_shards(small_cfg(tmp_path, width=56, height=56, **moving))
    with pytest.raises(ValueError, match="hold_frames"):
        ensure_synthetic_video_shards(small_cfg(tmp_path, frames=4, hold_frames=4))


def test_held_places_make_each_temporal_patch_still():
    """hold_frames=2: the two frames of each temporal patch are equal, and the shapes move between patches only."""
    cfg = SyntheticVideoConfig(frames=6, hold_frames=2, min_speed=10, max_speed=12)
    rng = random.Random(3)
    for _ in range(20):
        frames, objects = render_clip(rng, cfg)
        assert all(np.array_equal(frames[t], frames[t + 1]) for t in (0, 2, 4))
        assert not any(np.array_equal(frames[t], frames[t + 1]) for t in (1, 3))
        assert sv.positions(cfg) == 3 and all(10 <= o["speed"] <= 12 for o in objects)


def test_default_tokenizer_is_unchanged_and_the_video_one_knows_motion():
    """The default data config builds its tokenizer from exactly the image set's corpus, as before this set
    existed; data=synthetic_video adds the video words (one token each) and keeps every image caption's tokens."""
    before = load_tokenizer("tiny", corpus=corpus_lines())
    default = make_config().data
    assert not default.use_synthetic_video and not DataConfig().use_synthetic_video
    assert tokenizer_corpus(default) == corpus_lines()
    after = load_tokenizer("tiny", corpus=tokenizer_corpus(default))
    assert len(after) == len(before) and after.get_vocab() == before.get_vocab()

    video = make_config("data=synthetic_video").data
    assert video.use_synthetic_video and not video.use_synthetic
    tokenizer = load_tokenizer("tiny", corpus=tokenizer_corpus(video))
    assert len(tokenizer) > len(before)
    for word in ("moving", "left", "right", "up", "down"):
        assert len(tokenizer.tokenize(" " + word)) == 1, word
    words = "a red square moving left and an orange cross moving down".split()
    assert tokenizer.tokenize(" ".join(words)) == [words[0]] + ["Ġ" + w for w in words[1:]]


def test_video_preset_keeps_every_frame_at_its_size():
    data = make_config("data=synthetic_video").data
    clip = data.synthetic_video
    assert data.video.fps == clip.fps and clip.frames >= data.video.min_frames
    assert data.video.min_pixels <= clip.width * clip.height <= data.video.max_pixels
    assert clip.width % FACTOR == 0 and clip.height % FACTOR == 0


def test_video_preset_picks_its_curriculum_and_loss_unless_told_otherwise():
    video = make_config("data=synthetic_video")
    assert [s.steps for s in video.curriculum.stages] == [40, 1260] and video.loss.averaging == "token"
    chosen = make_config("data=synthetic_video", "curriculum=llava", "loss.averaging=mix")
    assert [s.name for s in chosen.curriculum.stages] == ["pretrain", "finetune"] and chosen.loss.averaging == "mix"
    default = make_config()  # the default run is untouched
    assert [s.steps for s in default.curriculum.stages] == [20, 800] and default.loss.averaging == "mix"


def test_caption_parsing_and_attribute_scores():
    assert caption_objects("a red square moving left and a blue ring") == [
        {"colour": "red", "shape": "square", "direction": "left"},
        {"colour": "blue", "shape": "ring"},
    ]
    assert parse_caption("a red square moving left and a blue ring") is None  # half moving: neither set's caption
    assert parse_caption("an orange cross") == [{"colour": "orange", "shape": "cross"}]  # the image set's
    assert parse_caption("a red square car") is None and parse_caption("hello") is None
    pairs = [
        ("a red square moving left and a blue ring moving up", "a red square moving right and a blue ring moving up"),
        ("an orange cross moving down", "an orange cross moving down and a red ring moving up"),
        ("a green triangle moving up", "a green"),  # garbled: nothing right
        ("a photo of a dog", "a red square"),  # not a synthetic caption: not scored
    ]
    scores = attribute_scores(pairs)
    assert scores["heldout_colour_acc"] == pytest.approx(3 / 4) and scores["heldout_colour_acc_n"] == 4
    assert scores["heldout_shape_acc"] == pytest.approx(3 / 4)
    assert scores["heldout_direction_acc"] == pytest.approx(2 / 4)
    assert scores["heldout_object_count_acc"] == pytest.approx(1 / 3) and scores["heldout_object_count_acc_n"] == 3
    image_only = attribute_scores([("a red ring and a blue cross", "a red ring and a blue square")])
    assert image_only["heldout_shape_acc"] == 0.5 and "heldout_direction_acc" not in image_only
    assert attribute_scores([("a photo of a dog", "a dog")]) == {}


def test_every_colour_shape_and_direction_can_be_drawn():
    """Captions cover the image set's colours and shapes, each in all four directions."""
    cfg = SyntheticVideoConfig()
    rng = random.Random(1)
    seen = set()
    for _ in range(2000):
        seen.update((o["colour"], o["shape"], o["direction"]) for o in render_clip(rng, cfg)[1])
    assert len(seen) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS)


def test_a_short_video_run_trains_and_scores_every_attribute(tmp_path):
    """data=synthetic_video end to end: the clips are the only source, their held-out split is scored, and the
    summary holds exact match and per-object colour, shape and direction accuracy."""
    cfg = make_config(
        "data=synthetic_video",
        f"run.dir={tmp_path}",
        f"data.synthetic_video.cache_dir={tmp_path / 'cache'}",
        "data.synthetic_video.num_train_clips=24",
        "data.synthetic_video.num_heldout_clips=4",
        "data.num_workers=0",
        "curriculum.stages.0.steps=1",
        "curriculum.stages.1.steps=2",
        "eval.num_caption=4",
        "eval.num_loss=4",
        "eval.max_new_tokens=16",
    )
    setup = build_data(cfg.data, cfg.model)
    assert [s.name for s in setup.sources] == ["shapes_video_caption"]
    assert [os.path.basename(u) for u in setup.heldout_urls] == ["heldout-000000.tar"]
    summary = run(cfg)
    assert summary["steps"] == 3 and summary["heldout_exact_match_n"] == 4
    predictions = [json.loads(line) for line in (tmp_path / "heldout_predictions.jsonl").read_text().splitlines()]
    assert all(p["image"] == f"video {FRAMES} frames of {WIDTH}x{HEIGHT} px" for p in predictions)
    # The summary scores the answers the run wrote (3 steps cannot caption yet: what is checked is the scoring).
    references = [p["expected"] for p in predictions if p["task"] == "caption"]
    scores = attribute_scores((p["expected"], p["generated"]) for p in predictions if p["task"] == "caption")
    names = [f"heldout_{a}_acc" for a in ("colour", "shape", "direction", "object_count")]
    assert len(references) == 4 and {n: summary[n] for n in names} == {n: scores[n] for n in names}
    moving = [o["direction"] for r in references for o in parse_caption(r)]
    assert summary["heldout_direction_acc_n"] == len(moving) >= 4
    # On the same references: the right captions score 1, and a captioner blind to time (right colours and shapes,
    # and the commonest direction for every object; or every direction reversed) loses the directions it gets wrong.
    assert all(v == 1 for k, v in attribute_scores((r, r) for r in references).items() if not k.endswith("_n"))
    guess = max(DIRECTIONS, key=moving.count)
    for wrong, share in [(dict.fromkeys(DIRECTIONS, guess), moving.count(guess) / len(moving)), (REVERSED, 0)]:
        blind = attribute_scores((r, redirected(r, wrong)) for r in references)
        assert blind["heldout_direction_acc"] == pytest.approx(share) and share < 1
        assert blind["heldout_colour_acc"] == blind["heldout_shape_acc"] == blind["heldout_object_count_acc"] == 1

    # vlm-evaluate on the run folder finds the video set's held-out shards from the run's config.
    args = ["--num-loss", "2", "--num-caption", "2", "--num-grounding", "0", "--max-new-tokens", "8", "--device", "cpu"]
    evaluated = evaluate_main([str(tmp_path), *args])
    assert evaluated["sets"] == {"shapes_video": 1} and evaluated["heldout_exact_match_n"] == 2
