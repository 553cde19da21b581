"""Videos against the pack budgets: thinned to fit rather than dropped, token dropping over their merge windows, and
interleaved documents split between entries to fit a pack."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from vlm_train.data.collate import collate
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import VIDEO_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import ImageSampling, kept_windows
from vlm_train.data.pack_planner import Budget
from vlm_train.data.truncate import image_runs
from vlm_train.data.video import Video
from vlm_train.data.video_patches import temporal_positions
from vlm_train.data.video_thinning import THINNED, encode_to_fit, thin_video, video_patches
from vlm_train.model import VLM, ModelConfig, VisionConfig
from vlm_train.model.vision_layout import pack_keep

from helpers import SPEC, tiny_tokenizer

WINDOWED = dict(window_size=56, fullatt_block_indexes=[1])


def _video(frames: int, height: int, width: int, fps: float, seed: int = 0) -> Video:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return Video(pixels, fps, [i / fps for i in range(frames)])


def _video_sample(video: Video, key: str = "clip") -> Sample:
    turns = [Turn("user", VIDEO_PLACEHOLDER + "What happens?"), Turn("assistant", "a red circle moves left")]
    return Sample(key, "test", "conversation", [], turns, videos=[video])


def _time_steps(encoded, special) -> list[int]:
    """The distinct temporal positions of the sample's (only) video, in order."""
    (start, end) = image_runs(encoded.input_ids, special.image_pad)[0]
    times = encoded.position_ids[0, start:end]
    return sorted(set((times - times[0]).tolist()))


def test_a_video_over_the_patch_budget_drops_frames_evenly_and_keeps_time_true():
    encoder = Encoder(tiny_tokenizer(), SPEC)
    video = _video(32, 56, 84, 2.0)  # 16 temporal patches x 4 x 6 = 384 patches
    full = encoder.encode(_video_sample(video))
    assert full.num_patches == 384
    budget = Budget(tokens=10_000, patches=100)
    fitted = encode_to_fit(encoder, _video_sample(video), budget)
    assert fitted.num_patches <= 100 and budget.overflow(fitted.num_tokens, fitted.num_patches, 1) is None
    (record,) = fitted.meta[THINNED]
    kept = record["frames"][1]
    assert record["frames"][0] == 32 and kept % 2 == 0 and 2 <= kept < 32
    assert record["size"][1] == [56, 84]  # frames went first; the size only shrinks once 2 frames are still over
    assert fitted.image_grid_thw.tolist() == [[kept // 2, 4, 6]]
    # The kept frames span the clip evenly, so one temporal patch now covers 32 / kept times the seconds.
    thinned = thin_video(video, 100, SPEC)
    assert thinned.timestamps[0] == 0.0 and thinned.timestamps[-1] == video.timestamps[-1]
    assert thinned.sample_fps == pytest.approx(2.0 * kept / 32)
    expected = temporal_positions(kept // 2, thinned.second_per_grid_t(2), SPEC.tokens_per_second)
    assert _time_steps(fitted, encoder.special) == expected.tolist()
    assert expected[-1] >= _time_steps(full, encoder.special)[-1] - 2 * 32 // kept  # still spans the clip


def test_frames_shrink_once_two_are_still_over_the_budget():
    video = _video(8, 112, 168, 4.0)
    thinned = thin_video(video, 12, SPEC)  # 2 frames of 8 x 12 patches = 96: must shrink to <= 12 patches
    assert thinned.frames.shape[0] == 2
    h, w = thinned.frames.shape[1:3]
    assert h % SPEC.factor == 0 and w % SPEC.factor == 0 and video_patches(2, h, w, SPEC) <= 12
    assert thinned.sample_fps == pytest.approx(1.0)  # 2 of 8 frames
    assert thin_video(video, 3, SPEC) is None  # under one merge window per frame: nothing fits


def test_the_token_budget_thins_too_and_a_fitting_video_is_left_alone():
    encoder = Encoder(tiny_tokenizer(), SPEC)
    video = _video(16, 56, 56, 2.0)  # 8 temporal patches of 2 x 2 tokens: 32 video tokens
    alone = encoder.encode(_video_sample(video))
    budget = Budget(tokens=alone.num_tokens - 16, patches=10_000)
    fitted = encode_to_fit(encoder, _video_sample(video), budget)
    assert fitted.num_tokens <= budget.tokens and THINNED in fitted.meta
    untouched = encode_to_fit(encoder, _video_sample(video), Budget(tokens=10_000, patches=10_000))
    assert THINNED not in untouched.meta and untouched.num_patches == alone.num_patches


def test_the_stream_counts_thinned_videos():
    from vlm_train.data import stream as stream_module
    from vlm_train.data.packer import PackConfig, Packer

    encoder = Encoder(tiny_tokenizer(), SPEC)
    long_clip = encode_to_fit(encoder, _video_sample(_video(32, 56, 84, 2.0)), Budget(10_000, 100))
    short_clip = encode_to_fit(encoder, _video_sample(_video(2, 56, 84, 2.0)), Budget(10_000, 100))

    class _Source:
        name = "web"

    class _Reader:
        def next(self):
            return {"__key__": "k"}

    class _Stream(stream_module.SlotStream):  # the per-sample step with a fixed encoding: no shards
        def __init__(self, encoded):
            self.sources, self.readers, self.weights = [_Source()], [_Reader()], [1.0]
            self.mixture = np.random.default_rng(0)
            self.packer = Packer(PackConfig(llm_budget=10_000, vit_budget=100), special=encoder.special)
            self.skipped, self._since_pack, self.pending, self.failures = Counter(), Counter(), [], 0
            self.encoded = encoded

        def _encode(self, source, raw):
            return [self.encoded.pop(0)]

    stream = _Stream([long_clip, short_clip])
    stream._step()
    stream._step()
    assert stream.skipped == Counter({f"web/{THINNED}": 1}) and stream.failures == 0


def _dropping_encoder() -> Encoder:
    sampling = ImageSampling(drop_prob=1.0, drop_rate_min=0.5, drop_rate_max=0.5)
    return Encoder(tiny_tokenizer(), SPEC, sampling)


def test_token_drop_removes_video_windows_and_their_pad_tokens():
    encoder = _dropping_encoder()
    video = _video(8, 56, 84, 2.0)  # 4 temporal patches x 2 x 3 windows = 24 windows
    encoded = encoder.encode(_video_sample(video), rng=np.random.default_rng(0))
    whole = Encoder(tiny_tokenizer(), SPEC).encode(_video_sample(video))
    (start, end) = image_runs(encoded.input_ids, encoder.special.image_pad)[0]
    assert end - start == 24 - 12  # half the windows dropped, one pad token each
    assert encoded.num_patches == 12 * 4 and encoded.patch_positions.shape == (48, 2)
    assert encoded.num_tokens == whole.num_tokens - 12
    # Kept windows keep their (t, row, column) positions; the text after the video does not move.
    (w_start, w_end) = image_runs(whole.input_ids, encoder.special.image_pad)[0]
    full_grid = whole.position_ids[:, w_start:w_end]
    kept = encoded.position_ids[:, start:end]
    assert all(any((full_grid[:, j] == kept[:, i]).all() for j in range(full_grid.shape[1])) for i in range(12))
    assert encoded.position_ids[0, -1] == whole.position_ids[0, -1]
    # The keep mask read back from the stacked patch positions names the same windows in t*h*w order.
    batch = collate([encoded], image_token_id=encoder.special.image_pad)
    keep = pack_keep(batch, SPEC.merge_size)
    draws = np.random.default_rng(0)  # the encoder's draws: drop or not, the rate, then the windows
    draws.random(), draws.uniform(0.5, 0.5)
    expected = kept_windows(24, 0.5, draws)
    assert keep.shape == (24,) and torch.nonzero(keep).flatten().tolist() == expected.tolist()
    assert {int(i) // 6 for i in expected} != {0}  # windows of later temporal patches are kept too (t is read back)


def test_the_model_runs_a_pack_with_dropped_video_windows():
    torch.manual_seed(0)
    encoder = _dropping_encoder()
    cfg = ModelConfig(vision=VisionConfig(**WINDOWED), attn_backend="sdpa")
    model = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder.special.image_pad).eval()
    samples = [
        encoder.encode(_video_sample(_video(8, 56, 84, 2.0, seed=1)), rng=np.random.default_rng(1)),
        encoder.encode(_video_sample(_video(4, 112, 56, 3.0, seed=2), key="b"), rng=np.random.default_rng(2)),
    ]
    batch = collate(samples, image_token_id=encoder.special.image_pad)
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape[0] == batch.input_ids.shape[0] and torch.isfinite(logits).all()


def test_thinning_keeps_the_draws_of_token_drop():
    encoder = _dropping_encoder()
    video = _video(32, 56, 84, 2.0)
    fitted = encode_to_fit(encoder, _video_sample(video), Budget(10_000, 100), rng=np.random.default_rng(3))
    assert fitted.num_patches <= 100 and THINNED in fitted.meta
    assert dataclasses.is_dataclass(fitted) and fitted.patch_positions.shape[0] == fitted.num_patches


# ---- interleaved documents ---------------------------------------------------------------------------------------


def _jpeg(width: int, height: int, seed: int) -> bytes:
    import io

    from helpers import noise_image

    out = io.BytesIO()
    noise_image(width, height, seed).save(out, format="JPEG")
    return out.getvalue()


def _document(paragraphs: int = 2, images: int = 2, drop_member: int | None = None) -> dict:
    """An OBELICS-style raw sample: text, image, text, image, ... with images as 0.jpg, 1.jpg, ..."""
    import json

    texts, image_entries, raw = [], [], {"__key__": "doc"}
    for i in range(max(paragraphs, images)):
        if i < paragraphs:
            texts.append(f"paragraph {i} says the red circle moves left and the blue square stays")
            image_entries.append(None)
        if i < images:
            texts.append(None)
            image_entries.append(f"https://example.com/{i}.jpg")  # not used to find the member
            if i != drop_member:
                raw[f"{i}.jpg"] = _jpeg(56 + 28 * (i % 2), 56, seed=i)
    raw["json"] = json.dumps({"texts": texts, "images": image_entries}).encode()
    return raw


def test_an_interleaved_document_is_one_text_sample_with_its_images_in_place():
    from vlm_train.data.batch import IGNORE_INDEX
    from vlm_train.data.formats import IMAGE_PLACEHOLDER, parse_sample

    sample = parse_sample(_document(), "web", 10**8)  # auto detects the layout
    assert sample.task == "text" and len(sample.images) == 2 and sample.meta["format"] == "interleaved"
    (turn,) = sample.turns
    assert turn.role == "text" and turn.text.count(IMAGE_PLACEHOLDER) == 2
    assert turn.text.startswith("paragraph 0") and turn.text.index(IMAGE_PLACEHOLDER) < turn.text.index("paragraph 1")
    encoder = Encoder(tiny_tokenizer(), SPEC)
    encoded = encoder.encode(sample)
    special = encoder.special
    runs = image_runs(encoded.input_ids, special.image_pad)
    assert len(runs) == 2 and encoded.image_grid_thw.shape[0] == 2
    ids, labels = encoded.input_ids, encoded.labels
    for start, end in runs:
        assert ids[start - 1] == special.vision_start and ids[end] == special.vision_end
        # No token learns to predict an image's tokens (vision start, pads, end); the text after it is learnt.
        assert (labels[start - 2 : end] == IGNORE_INDEX).all() and labels[end] != IGNORE_INDEX
    assert labels[0] != IGNORE_INDEX and ids[-1] == special.pad  # text is supervised, the document ends with pad


def test_a_missing_image_member_is_a_counted_skip():
    from vlm_train.data.decode import SkipSample
    from vlm_train.data.formats import parse_sample

    with pytest.raises(SkipSample) as info:
        parse_sample(_document(drop_member=1), "web", 10**8, "interleaved")
    assert info.value.reason == "missing_image"


def test_a_long_document_is_split_between_entries_into_parts_that_fit():
    from vlm_train.data.formats import parse_sample
    from vlm_train.data.interleaved import ENTRIES, split_document

    encoder = Encoder(tiny_tokenizer(), SPEC)
    sample = parse_sample(_document(paragraphs=6, images=5), "web", 10**8, "interleaved")
    whole = encoder.encode(sample)
    budget = Budget(tokens=whole.num_tokens // 3, patches=10_000)
    parts = split_document(sample, encoder, budget)
    assert len(parts) >= 3 and [p.key for p in parts] == [f"doc#{n}" for n in range(len(parts))]
    for part in parts:
        encoded = encoder.encode(part)
        assert budget.overflow(encoded.num_tokens, encoded.num_patches, len(part.images)) is None
        runs = image_runs(encoded.input_ids, encoder.special.image_pad)
        assert len(runs) == len(part.images) == encoded.image_grid_thw.shape[0]  # every image whole in one part
        for start, end in runs:
            assert encoded.input_ids[start - 1] == encoder.special.vision_start
            assert encoded.input_ids[end] == encoder.special.vision_end
    # Every text entry lands in exactly one part, in order.
    texts = [e for p in parts for e in p.meta[ENTRIES] if isinstance(e, str)]
    assert texts == [e for e in sample.meta[ENTRIES] if isinstance(e, str)]
    patches = Budget(tokens=10_000, patches=whole.num_patches // 2)
    assert all(encoder.encode(p).num_patches <= patches.patches for p in split_document(sample, encoder, patches))
    assert split_document(sample, encoder, Budget(10_000, 10_000)) == [sample]


# ---- figures tools -------------------------------------------------------------------------------------------------


def test_bench_loader_video_mode_reports_clip_throughput():
    from tools.bench_loader import main

    result = main(["--video", "--samples", "1", "--clip-seconds", "1", "--clip-width", "112", "--clip-height", "64"])
    assert result["clips"] == 1 and result["sampled_frames_per_clip"] == 4  # min_frames for a 1 s clip at 2 fps
    assert result["samples_per_s_one_core"] > 0 and result["patches_per_clip"] > 0


CODEC_LOSS = 3.0  # mean |level| difference H.264 (CRF 18, yuv420p) leaves on the known clip (0.27 measured)


def _known_clip(path, frames: int = 30, fps: int = 30, height: int = 64, width: int = 112) -> np.ndarray:
    """Writes an H.264 clip whose frame i is grey level 8 i with a white bar at x = 3 i, and returns its frames as
    encoded: what a decoder should give back, up to codec loss (each frame differs from any other by 8 levels or
    more, far over that loss)."""
    import av

    pixels = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        pixels[i] = 8 * i
        pixels[i, :, 3 * i : 3 * i + 8] = 255
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return pixels


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return float(np.abs(a.astype(np.int16) - b).mean())


def test_bench_video_decoders_measures_each_reader_against_the_frames_the_clip_holds(tmp_path, monkeypatch):
    from tools import bench_video_decoders as bench
    from vlm_train.data.video import resize_frame

    pixels = _known_clip(tmp_path / "known.mp4")
    clip = ((tmp_path / "known.mp4").read_bytes(), str(tmp_path / "known.mp4"))
    indices, size = bench.plan(clip[0], 30)
    assert len(indices) == 4 and len(set(indices.tolist())) == 4  # min_frames for 1 s at 2 fps, all different
    expected = np.stack([resize_frame(pixels[i], *size) for i in indices])
    # The reference reader (the loader's decoder, sampling by itself) gives the frames the plan names.
    assert _mean_abs_diff(bench.read_pyav(*clip, indices, size), expected) < CODEC_LOSS
    # A reader returning the right frames measures within codec loss of it; one returning them out of order, far off.
    monkeypatch.setitem(bench.READERS, "encoded", lambda data, path, chosen, hw: expected)
    monkeypatch.setitem(bench.READERS, "reversed", lambda data, path, chosen, hw: expected[::-1].copy())
    results = bench.bench([clip], 30, ["encoded", "reversed"])
    assert results["encoded"]["mean_abs_diff_from_pyav"] < CODEC_LOSS
    assert results["reversed"]["mean_abs_diff_from_pyav"] > 20 * CODEC_LOSS
    assert results["encoded"]["clips_per_s_one_core"] > 0


def test_bench_video_decoders_times_pyav_and_reports_what_does_not_load(monkeypatch):
    from tools import bench_video_decoders as bench

    def not_installed(data, path, indices, size):
        raise ModuleNotFoundError("No module named 'somereader'")

    monkeypatch.setitem(bench.READERS, "somereader", not_installed)
    args = ["--samples", "1", "--clip-seconds", "1", "--clip-width", "112", "--clip-height", "64"]
    result = bench.main([*args, "--readers", "pyav,somereader"])
    pyav = result["readers"]["pyav"]
    assert result["sampled_frames_per_clip"] == 4 and pyav["clips_per_s_one_core"] > 0 and pyav["ms_per_clip"] > 0
    assert result["readers"]["somereader"] == {"error": "ModuleNotFoundError: No module named 'somereader'"}
    with pytest.raises(SystemExit):
        bench.main([*args, "--readers", "ffmpeg-cli"])


@pytest.mark.parametrize(
    "name, module", [("torchcodec", "torchcodec.decoders"), ("opencv", "cv2"), ("decord", "decord")]
)
def test_the_other_readers_give_the_frames_the_clip_holds(tmp_path, name, module):
    """Not dependencies: each is checked where it loads (torchcodec needs FFmpeg's shared libraries on the system
    and a build for the installed torch)."""
    import importlib

    from tools import bench_video_decoders as bench
    from vlm_train.data.video import resize_frame

    try:
        importlib.import_module(module)
    except Exception as exc:  # not installed, or its native libraries do not load
        pytest.skip(f"{name} does not load here: {type(exc).__name__}: {exc}"[:300])
    pixels = _known_clip(tmp_path / "known.mp4")
    data = (tmp_path / "known.mp4").read_bytes()
    indices, size = bench.plan(data, 30)
    expected = np.stack([resize_frame(pixels[i], *size) for i in indices])
    assert _mean_abs_diff(bench.READERS[name](data, str(tmp_path / "known.mp4"), indices, size), expected) < CODEC_LOSS


def test_the_mix_with_videos_holds_the_share_and_video_grids():
    from tools.pack_mix import MixShares, make_mix

    records = make_mix(2000, seed=0, shares=MixShares(0.45, 0.315, 0.135, 0.1))
    videos = [r for r in records if r["kind"] == "video"]
    assert 150 < len(videos) < 250
    for r in videos:
        (t, h, w) = r["grids"][0]
        assert t >= 2 and r["vit_patches"] == t * h * w and r["llm_tokens"] > r["vit_patches"] // 4
    assert make_mix(50, seed=0) == make_mix(50, seed=0, shares=MixShares())  # no videos: the mix is unchanged


def test_a_text_entry_longer_than_a_pack_stands_alone_and_too_long_cuts_it():
    import json

    from vlm_train.data.formats import parse_sample
    from vlm_train.data.interleaved import split_document
    from vlm_train.data.packer import PackConfig, Packer

    long_text = " ".join(["the red circle moves left"] * 80)
    raw = {
        "__key__": "doc",
        "json": json.dumps({"texts": ["a short intro", None, long_text], "images": [None, "x", None]}).encode(),
        "0.jpg": _jpeg(56, 56, seed=0),
    }
    encoder = Encoder(tiny_tokenizer(), SPEC)
    sample = parse_sample(raw, "web", 10**8)
    parts = split_document(sample, encoder, Budget(tokens=64, patches=10_000))
    assert [len(p.images) for p in parts] == [1, 0]  # intro + image, then the long text alone
    too_long = encoder.encode(parts[1])
    assert too_long.num_tokens > 64
    packer = Packer(PackConfig(llm_budget=64, vit_budget=10_000, too_long="truncate"), special=encoder.special)
    assert packer.check(too_long).num_tokens == 64


def test_the_loader_splits_a_long_document_into_parts_and_resumes_inside_one(tmp_path):
    """Through real shards and the stream: a document over the token budget reaches the packs as its parts (each
    within budget, keyed by part), and a state taken while parts wait in the packing buffer resumes exactly."""
    import webdataset as wds

    from vlm_train.data.config import DataConfig
    from vlm_train.data.loader import PackedStream
    from vlm_train.data.sources import Source

    url = str(tmp_path / "docs.tar")
    with wds.TarWriter(url) as writer:
        for n in range(6):
            writer.write({**_document(paragraphs=6, images=4), "__key__": f"doc{n}"})
    cfg = DataConfig(shuffle_buffer=2)
    cfg.pack.llm_budget, cfg.pack.vit_budget, cfg.pack.buffer_size = 160, 4096, 3

    def slot():
        stream = PackedStream(
            [Source("web", [url], format="interleaved")], Encoder(tiny_tokenizer(), SPEC), cfg, 0, 0, 1
        )
        return stream.slot_stream(0, 1)

    first = slot()
    packs = [first.next_pack() for _ in range(3)]
    state = first.state_dict()
    expected = [first.next_pack() for _ in range(4)]
    keys = [m["restore_key"] for p in packs + expected for m in p.meta]
    assert {k.get("part") for k in keys} == {0, 1} and all(p.num_tokens <= 160 for p in packs + expected)
    assert first.skipped == Counter()
    resumed = slot()
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_pack()
        assert torch.equal(got.input_ids, want.input_ids) and got.meta == want.meta
