"""Video samples in shards: member names, caption / conversation / frame-folder forms, counted skips, make_shards,
inspect_shards, and the loader end to end to a PackedBatch with video grids (t > 1)."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, detect_format, parse_sample, video_members
from vlm_train.data.loader import PackedStream, Source, iter_samples
from vlm_train.data.video import VideoConfig

from helpers import encoder

W, H = 64, 48
SMALL = VideoConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)  # a few merge windows per frame: fast


def mp4(count: int = 8, level: int = 0, fmt: str = "mp4") -> bytes:
    """A tiny H.264 clip of `count` flat frames (grey level `level` + 6 * i) at 4 fps."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), level + 6 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def jpg(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (W, H), (level, level, level)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(width: int = 56, height: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(*turns: tuple[str, str], **extra) -> bytes:
    record = {"conversations": [{"from": who, "value": text} for who, text in turns], **extra}
    return json.dumps(record).encode()


def parse(raw: dict, fmt: str = "auto"):
    return parse_sample({"__key__": "k", **raw}, "src", 10**7, fmt, video=SMALL, factor=28)


def test_caption_with_one_mp4_is_a_video_caption_sample():
    sample = parse({"mp4": mp4(), "txt": b"a grey fade"})
    assert sample.task == "caption" and sample.images == [] and len(sample.videos) == 1
    assert sample.turns[0].text == VIDEO_PLACEHOLDER + "Describe the image."
    assert IMAGE_PLACEHOLDER not in sample.turns[0].text and sample.turns[1].text == "a grey fade"
    frames = sample.videos[0].frames
    assert frames.ndim == 4 and frames.shape[0] % 2 == 0 and frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    # a caption in the JSON (img2dataset's layout) works as for images, and every container extension is read
    sample = parse({"mkv": mp4(fmt="matroska"), "json": json.dumps({"caption": "grey"}).encode()})
    assert len(sample.videos) == 1 and sample.meta["answer"] == "grey"


def test_numbered_videos_go_in_member_order():
    raw = {
        "1.mp4": mp4(level=120),
        "0.mp4": mp4(level=0),
        "json": conversation(("human", "<video>\n<video>\nWhich is brighter?"), ("gpt", "The second.")),
    }
    sample = parse(raw)
    assert sample.task == "conversation" and len(sample.videos) == 2
    assert sample.videos[0].frames.mean() < sample.videos[1].frames.mean()
    # a gap in the numbers is a lost member, not a reordering
    with pytest.raises(SkipSample) as exc:
        parse({"0.mp4": mp4(), "2.mp4": mp4(), "json": raw["json"]})
    assert exc.value.reason == "ambiguous_videos"


def test_frame_folder_with_fps_is_one_video_at_that_rate():
    frames = {f"frames.{i:03d}.jpg": jpg(10 * i) for i in range(8)}
    sample = parse({**frames, "json": json.dumps({"caption": "a fade", "fps": 4}).encode()})
    (video,) = sample.videos
    assert sample.turns[0].text.startswith(VIDEO_PLACEHOLDER) and video.frames.shape[0] % 2 == 0
    assert video.timestamps[0] == 0.0 and video.timestamps[-1] == pytest.approx(7 / 4)  # 8 frames at 4 fps
    assert [v.mean() for v in video.frames] == sorted(v.mean() for v in video.frames)  # in frame-number order


def test_frame_folder_without_fps_is_a_skip_naming_it():
    frames = {f"frames.{i:03d}.jpg": jpg(i) for i in range(4)}
    with pytest.raises(SkipSample) as exc:
        parse({**frames, "txt": b"a fade"})
    assert exc.value.reason == "missing_fps" and "fps" in str(exc.value)
    with pytest.raises(SkipSample) as exc:
        parse({**frames, "json": json.dumps({"caption": "x", "fps": "fast"}).encode()})
    assert exc.value.reason == "bad_video_fps"


def test_conversation_with_video_in_the_llava_video_layout():
    record = conversation(
        ("human", "<video>\nWhat happens?"),
        ("gpt", "It fades in."),
        ("human", "Then?"),
        ("gpt", "It ends."),
        video="clips/x.mp4",
        id="x",
    )
    sample = parse({"mp4": mp4(), "json": record})
    assert sample.task == "conversation" and len(sample.videos) == 1 and sample.images == []
    assert sample.turns[0].role == "user" and sample.turns[0].text.startswith(VIDEO_PLACEHOLDER)
    assert sample.meta["answer"] == "It ends."


def test_images_and_videos_together_when_each_placeholder_count_matches():
    record = conversation(("human", "<image> and <video>: same colour?"), ("gpt", "No."))
    sample = parse({"png": png(), "webm": mp4(), "json": record})  # the member's name, not its codec, picks it
    assert len(sample.images) == 1 and len(sample.videos) == 1


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            {"mp4": mp4(), "json": conversation(("human", "<video><video> compare"), ("gpt", "same"))},
            "video_count_mismatch",
        ),
        (
            {"0.mp4": mp4(), "1.mp4": mp4(), "json": conversation(("human", "<video>?"), ("gpt", "a"))},
            "video_count_mismatch",
        ),
        ({"mp4": mp4(), "json": conversation(("human", "what?"), ("gpt", "a"))}, "video_count_mismatch"),
        ({"mp4": mp4(), "json": conversation(("human", "<image> what?"), ("gpt", "a"))}, "image_count_mismatch"),
        (
            {"mp4": mp4(), "json": conversation(("human", "<video> what?"), ("gpt", "a <video>"))},
            "video_count_mismatch",
        ),
        ({"mp4": mp4(), "png": png(), "txt": b"both"}, "image_count_mismatch"),
        ({"mp4": mp4(), "0.mp4": mp4(), "txt": b"two forms"}, "ambiguous_videos"),
        ({"mp4": mp4(), "mov": mp4(), "txt": b"two singles"}, "ambiguous_videos"),
        ({"0.mp4": mp4(), "1.mp4": mp4(), "txt": b"caption of two"}, "video_count_mismatch"),
        ({"mp4": b"not a video at all", "txt": b"broken"}, "corrupt_video"),
    ],
)
def test_bad_video_samples_are_counted_skips(raw, reason):
    with pytest.raises(SkipSample) as exc:
        parse(raw)
    assert exc.value.reason == reason


def test_video_outside_a_user_turn_is_a_bad_conversation():
    raw = {"mp4": mp4(), "json": conversation(("human", "what?"), ("gpt", "<video>"))}
    with pytest.raises(SkipSample) as exc:
        parse(raw)
    assert exc.value.reason == "bad_conversation"


def test_detect_format_recognises_video_members():
    clip = b"bytes are not read to detect"
    assert detect_format({"mp4": clip, "txt": b"c"}, None) == "caption"
    assert detect_format({"0.mp4": clip, "txt": b"c"}, None) == "caption"
    assert detect_format({"frames.000.jpg": clip, "json": b"{}"}, {"caption": "c", "fps": 2}) == "caption"
    assert detect_format({"avi": clip, "json": b"{}"}, {"conversations": []}) == "conversation"
    assert [len(m) for m in video_members({"frames.001.png": b"b", "frames.000.png": b"a"})] == [2]
    assert video_members({"frames.001.png": b"b", "frames.000.png": b"a"})[0] == [b"a", b"b"]
    with pytest.raises(SkipSample) as exc:
        detect_format({"txt": b"no media"}, None)
    assert exc.value.reason == "missing_image"


def _write_shard(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def test_loader_packs_videos_with_t_above_one_and_counts_corrupt_ones(tmp_path):
    samples = [{"__key__": f"v{i}", "mp4": mp4(level=10 * i), "txt": f"clip number {i}"} for i in range(4)]
    samples.insert(2, {"__key__": "bad", "mp4": b"\x00\x00\x00\x18ftypmp42 truncated", "txt": "broken"})
    url = _write_shard(tmp_path / "videos.tar", samples)
    cfg = DataConfig(shuffle_buffer=2, video=SMALL)
    cfg.pack.llm_budget, cfg.pack.buffer_size = 2000, 2
    stream = PackedStream([Source("clips", [url])], encoder(), cfg, seed=0, rank=0, world_size=1)
    skipped, keys, grids = Counter(), [], []
    for batch in itertools.islice(iter(stream), 4):
        skipped.update(batch.skipped)
        keys += [m["key"] for m in batch.meta]
        grids += batch.image_grid_thw.tolist()
    assert skipped["clips/corrupt_video"] >= 1 and "bad" not in keys
    assert {f"v{i}" for i in range(4)} <= set(keys)
    assert grids and all(t > 1 for t, _, _ in grids)  # 8 frames at 4 fps -> 4 sampled frames -> 2 temporal patches
    # iter_samples (evaluation) takes the same video options
    decoded = list(iter_samples([url], "clips", 10**7, video=SMALL, factor=28))
    assert len(decoded) == 4 and all(len(s.videos) == 1 for s in decoded)


def test_a_missing_pyav_stops_the_loader_naming_it_instead_of_skipping_every_video(tmp_path, monkeypatch):
    import vlm_train.data.video as video

    def no_pyav():
        raise ModuleNotFoundError(video.PYAV_MISSING, name="av")

    monkeypatch.setattr(video, "pyav", no_pyav)  # a machine without av
    url = _write_shard(tmp_path / "videos.tar", [{"__key__": "v0", "mp4": mp4(), "txt": "a clip"}])
    stream = PackedStream([Source("clips", [url])], encoder(), DataConfig(video=SMALL), seed=0, rank=0, world_size=1)
    with pytest.raises(ModuleNotFoundError, match="install av"):
        next(iter(stream))


def test_make_shards_from_a_llava_video_json_and_a_video_folder_reads_back(tmp_path):
    from vlm_train.cli import inspect_shards, make_shards

    clips = tmp_path / "clips" / "sub"
    clips.mkdir(parents=True)
    for i, name in enumerate(["a.mp4", "b.mp4", "c.mp4"]):
        (clips / name).write_bytes(mp4(level=20 * i))
    (clips / "broken.mp4").write_bytes(b"not a video")
    turns = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "it gets brighter"}]
    records = [
        {"id": "llava.video/1", "video": "sub/a.mp4", "conversations": turns("<image>\nWhat happens?")},  # 178K habit
        {"id": "two", "video": ["sub/b.mp4", "sub/c.mp4"], "conversations": turns("<video> then <video>?")},
        {"id": "cap", "video": "sub/c.mp4", "caption": "a grey clip"},
        {"id": "gone", "video": "sub/missing.mp4", "conversations": turns("<video>?")},
        {"id": "odd", "video": "sub/a.gif", "conversations": turns("<video>?")},
        {"id": "bad", "video": "sub/broken.mp4", "caption": "never decodes"},
    ]
    (tmp_path / "v.json").write_text(json.dumps(records))
    out = make_shards.main(
        ["llava", "--json", str(tmp_path / "v.json"), "--videos", str(tmp_path / "clips"), "--out", str(tmp_path / "v")]
    )
    assert out["samples"] == 4 and out["skipped"] == {"missing_video": 1, "unsupported_video": 1}
    assert out["format"] == "auto"  # conversations and captions together

    report = inspect_shards.main([out["urls"], "--previews", "3", "--video-max-pixels", str(16 * 28 * 28)])
    assert report["by_format"] == {"conversation": 2, "caption": 1} and report["invalid_by_reason"] == {
        "corrupt_video": 1
    }
    assert report["video_samples_by_format"] == {"conversation": 2, "caption": 1} and report["videos"] == 4
    first = report["previews"][0]
    assert first["turns"][0]["text"].startswith(VIDEO_PLACEHOLDER) and first["videos"][0]["frames"] >= 2
    assert all(grid[0] > 1 for grid in first["image_grids"])  # a video grid has several temporal patches

    # the real loader path: the shards' samples decode to videos and pack with t > 1
    cfg = DataConfig(shuffle_buffer=2, video=SMALL)
    cfg.pack.llm_budget, cfg.pack.buffer_size = 2000, 2
    stream = PackedStream([Source("v", [out["urls"]], format=out["format"])], encoder(), cfg, 0, 0, 1)
    keys, skipped = set(), Counter()
    for batch in itertools.islice(iter(stream), 4):
        keys |= {m["key"] for m in batch.meta}
        skipped.update(batch.skipped)
        assert all(t > 1 for t in batch.image_grid_thw[:, 0].tolist())
    assert len(keys) == 3 and skipped["v/corrupt_video"] >= 1


def test_make_shards_captions_folder_takes_videos_with_a_txt_beside_them(tmp_path):
    from vlm_train.cli import make_shards

    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "a.webm").write_bytes(mp4())  # the member takes the file's extension; its codec does not matter
    (folder / "a.txt").write_text("a grey clip")
    (folder / "b.mp4").write_bytes(mp4())  # no caption: counted, left out
    out = make_shards.main(["captions", "--videos", str(folder), "--out", str(tmp_path / "c")])
    assert out["samples"] == 1 and out["skipped"] == {"missing_caption": 1} and out["format"] == "caption"
    (sample,) = iter_samples([out["urls"]], "c", 10**7, video=SMALL)
    assert len(sample.videos) == 1 and sample.turns[1].text == "a grey clip"


def test_generate_tool_answers_about_a_video(tmp_path, capsys):
    from vlm_train.cli.generate import main

    from tools_helpers import save_run, small_model

    save_run(tmp_path / "run", small_model(), video=SMALL)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(mp4())
    args = [str(tmp_path / "run"), "--video", str(clip), "--prompt", "What happens in <video>?", "--json"]
    result = main([*args, "--max-new-tokens", "4"])
    assert json.loads(capsys.readouterr().out)["answer"] == result["answer"]
    assert result["images"] == 0 and len(result["videos"]) == 1 and result["videos"][0]["frames"] >= 2
    assert 0 < result["new_tokens"] <= 4
    with pytest.raises(ValueError, match="2 <video> placeholders but 1 videos"):
        main([str(tmp_path / "run"), "--video", str(clip), "--prompt", "<video> or <video>?"])
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        main([str(tmp_path / "run"), "--video", str(tmp_path / "gone.mp4"), "--prompt", "hi"])


def test_evaluate_tool_runs_on_held_out_video_captions(tmp_path, capsys):
    from vlm_train.cli.evaluate import main

    from tools_helpers import save_run, small_model

    save_run(tmp_path / "run", small_model(seed=1), video=SMALL)
    shard = _write_shard(
        tmp_path / "heldout.tar",
        [{"__key__": f"v{i}", "mp4": mp4(level=30 * i), "txt": f"clip {i}"} for i in range(2)]
        + [{"__key__": "bad", "mp4": b"junk", "txt": "x"}],
    )
    args = ["--heldout", f"clips={shard}", "--num-loss", "5", "--num-caption", "2", "--num-grounding", "0"]
    predictions = tmp_path / "preds.jsonl"
    summary = main([str(tmp_path / "run"), *args, "--max-new-tokens", "3", "--predictions", str(predictions)])
    assert summary["heldout_exact_match_n"] == 2 and summary["heldout_loss/task/caption"] > 0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 2 and all("video" in str(line) for line in lines)
