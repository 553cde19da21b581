"""Video decoding and frame sampling on real files written here with PyAV (H.264 .mp4, VP9 .webm)."""

import io
import math
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from vlm_train.data import video as video_module
from vlm_train.data.decode import SkipSample
from vlm_train.data.video import VideoConfig, decode_video, frame_size, sample_plan, smart_nframes, video_from_frames

W, H = 64, 48
FACTOR = 28
LEVEL = 6  # frame i is a flat grey of level 6 * i: identifiable after lossy compression


def small(**overrides) -> VideoConfig:
    """A config whose frames resize to a few merge windows, so tests stay fast."""
    return VideoConfig(**{"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, **overrides})


def encode(
    count: int,
    codec: str = "libx264",
    fmt: str = "mp4",
    rate: int = 10,
    pts_ms: list[int] | None = None,
    gop: int | None = None,
) -> bytes:
    """A clip of `count` flat grey frames (frame i at level 6 * i); pts_ms gives irregular times (time base 1 ms)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "4", "b:v": "0"} if codec == "libvpx-vp9" else {"crf": "4"}
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), LEVEL * i, np.uint8), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def frame_ids(video) -> list[int]:
    return [round(float(frame.mean()) / LEVEL) for frame in video.frames]


def qwen_indices(total: int, nframes: int) -> list[int]:
    """qwen-vl-utils' torch.linspace(0, total - 1, nframes).round() (numpy rounds halves to even, as torch does)."""
    return np.round(np.linspace(0, total - 1, nframes)).astype(int).tolist()


@pytest.fixture(scope="module")
def clip_40():
    return encode(40)  # 4 s at 10 fps


def no_fallback(monkeypatch):
    """Fail if decoding falls back to the sequential pass (the frames must be found by their pts)."""

    def fail(*args, **kwargs):
        raise AssertionError("fell back to the sequential pass")

    monkeypatch.setattr(video_module, "_decode_nearest", fail)


@pytest.mark.parametrize("gop", [None, 3])  # x264's default long GOP (decode forward) and a short one (seeks)
def test_constant_rate_h264_samples_qwen_vl_utils_frames(monkeypatch, gop):
    data = encode(40, gop=gop)
    no_fallback(monkeypatch)
    video = decode_video(data, small(), FACTOR)
    # 4 s x 2 fps = 8 frames: indices linspace(0, 39, 8).round()
    assert frame_ids(video) == qwen_indices(40, 8) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert video.frames.shape == (8, 56, 56, 3) and video.frames.dtype == np.uint8
    assert video.timestamps == pytest.approx([i / 10 for i in qwen_indices(40, 8)])
    assert video.sample_fps == pytest.approx(8 / 40 * 10)  # nframes / total_frames * video_fps = 2.0
    assert video.second_per_grid_t(2) == pytest.approx(1.0)


class CountingContainer:
    """Wraps a PyAV input container to count the frames it decodes and the seeks asked of it."""

    def __init__(self, container, log):
        self.container, self.log = container, log

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        self.container.__enter__()
        return self

    def __exit__(self, *exc):
        return self.container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.log["decoded"] += 1
            yield frame

    def seek(self, *args, **kwargs):
        self.log["seeks"] += 1
        return self.container.seek(*args, **kwargs)


@pytest.mark.parametrize("gop", [None, 3])
def test_only_needed_frames_are_decoded_and_only_sampled_ones_converted(monkeypatch, gop):
    data = encode(40, gop=gop)
    log = {"opened": 0, "decoded": 0, "seeks": 0, "converted": 0}
    real_open, real_resize = av.open, video_module.resize_frame

    def counting_open(*args, **kwargs):
        log["opened"] += 1
        return CountingContainer(real_open(*args, **kwargs), log)

    monkeypatch.setattr(av, "open", counting_open)

    def counting_resize(*args):
        log["converted"] += 1
        return real_resize(*args)

    monkeypatch.setattr(video_module, "resize_frame", counting_resize)
    assert frame_ids(decode_video(data, small(), FACTOR)) == [0, 6, 11, 17, 22, 28, 33, 39]
    # A long GOP decodes forward to the last sampled frame; keyframes every 3 frames let it seek past the rest.
    # The file is opened once: indexed, rewound (one seek) and decoded.
    assert log["converted"] == 8 and log["opened"] == 1
    if gop is None:
        assert log["decoded"] == 40 and log["seeks"] == 1
    else:  # (14 decoded and 1 + 7 seeks with PyAV 18's FFmpeg)
        assert log["decoded"] <= 20 and log["seeks"] >= 6


def test_vp9_webm_decodes_and_samples(monkeypatch):
    data = encode(30, codec="libvpx-vp9", fmt="webm", rate=15)  # 2 s at 15 fps
    no_fallback(monkeypatch)
    video = decode_video(data, small(), FACTOR)
    assert frame_ids(video) == qwen_indices(30, 4) == [0, 10, 19, 29]  # 2 s x 2 fps = 4 frames
    assert video.sample_fps == pytest.approx(4 / 30 * 15)
    # The stream's own times: WebM keeps whole milliseconds. The rate is the header's (the times agree with it).
    assert video.timestamps == pytest.approx([0, 10 / 15, 19 / 15, 29 / 15], abs=1e-3)


def test_variable_frame_rate_samples_by_timestamp_not_index(monkeypatch):
    # Ten frames 50 ms apart, then ten 500 ms apart: 5.45 s in all.
    pts = [50 * i for i in range(10)] + [950 + 500 * i for i in range(10)]
    data = encode(20, pts_ms=pts)
    no_fallback(monkeypatch)
    video = decode_video(data, small(), FACTOR)
    times = np.array(pts) / 1000
    fps = 19 / times[-1]  # the clip's mean rate over its span
    nframes = math.floor(20 / fps * 2.0 / 2) * 2  # 11.5 -> 10
    targets = np.linspace(0, times[-1], nframes)
    nearest = [int(np.argmin(np.abs(times - t))) for t in targets]
    assert frame_ids(video) == nearest == [0, 9, 11, 12, 13, 14, 15, 17, 18, 19]
    assert nearest != qwen_indices(20, nframes)  # by index it would take other frames
    assert video.timestamps == pytest.approx(times[nearest].tolist())
    assert video.sample_fps == pytest.approx(nframes / 20 * fps)


def test_the_sequential_fallback_picks_the_same_frames(monkeypatch):
    pts = [50 * i for i in range(10)] + [950 + 500 * i for i in range(10)]
    data = encode(20, pts_ms=pts)
    monkeypatch.setattr(video_module, "_decode_frames", lambda *args: {})  # as if no decoded pts matched
    assert frame_ids(decode_video(data, small(), FACTOR)) == [0, 9, 11, 12, 13, 14, 15, 17, 18, 19]


def test_frame_count_clamps(clip_40):
    assert smart_nframes(40, 10.0, small(fps=0.1)) == 4  # 0.4 -> min_frames
    assert smart_nframes(40, 10.0, small(fps=10, max_frames=7)) == 6  # max_frames rounded down to even
    assert smart_nframes(40, 10.0, small(fps=0.1, min_frames=5)) == 6  # min_frames rounded up to even
    assert smart_nframes(40, 10.0, small(fps=100)) == 40  # never more than the clip has
    assert smart_nframes(3, 10.0, small()) == 2  # a short clip: even, at most its length
    assert smart_nframes(1, 10.0, small()) == 2  # one frame: repeated (qwen-vl-utils raises)
    video = decode_video(clip_40, small(fps=10, max_frames=6), FACTOR)
    assert frame_ids(video) == qwen_indices(40, 6)
    chosen, sample_fps = sample_plan(np.array([0.0]), 1.0, small())
    assert chosen.tolist() == [0, 0] and sample_fps == 2.0


def qwen_smart_resize(height, width, factor, min_pixels, max_pixels):
    """qwen-vl-utils' smart_resize, transcribed for comparison."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize("nframes", [4, 40, 100, 768])
@pytest.mark.parametrize("size", [(1080, 1920), (360, 640), (48, 64), (720, 1280)])
def test_frame_size_is_qwen_vl_utils_within_the_budgets(nframes, size):
    cfg = VideoConfig()
    h, w = frame_size(*size, nframes, cfg, FACTOR)
    budget = max(min(cfg.max_pixels, cfg.total_pixels / nframes * 2), int(cfg.min_pixels * 1.05))
    assert (h, w) == qwen_smart_resize(*size, FACTOR, cfg.min_pixels, budget)
    assert h % FACTOR == 0 and w % FACTOR == 0
    # A large frame shrinks to within the budget (flooring to the factor may take it a little under min_pixels, as
    # in qwen-vl-utils); a small one grows to at least min_pixels (ceiling may take it a little over the budget).
    if size[0] * size[1] >= cfg.min_pixels:
        assert h * w <= budget
    else:
        assert h * w >= cfg.min_pixels
    if budget < cfg.max_pixels and budget > cfg.min_pixels * 1.05:  # the total budget binds
        assert nframes * h * w / 2 <= cfg.total_pixels


def test_resize_is_antialiased_bicubic_rounded_to_uint8():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = video_module.resize_frame(pixels, 28, 56)
    assert out.shape == (28, 56, 3) and out.dtype == np.uint8
    x = video_module.torch.from_numpy(pixels).permute(2, 0, 1)[None].double()
    ref = video_module.F.interpolate(x, size=(28, 56), mode="bicubic", antialias=True).clamp(0, 255).round()
    assert np.abs(out.astype(int) - ref[0].permute(1, 2, 0).numpy().astype(int)).max() <= 1
    flat = np.full((48, 64, 3), 77, np.uint8)
    assert (video_module.resize_frame(flat, 84, 112) == 77).all()


def skip_reason(data: bytes, cfg: VideoConfig | None = None) -> str:
    with pytest.raises(SkipSample) as err:
        decode_video(data, cfg or small(), FACTOR)
    return err.value.reason


def test_truncated_and_random_bytes_are_corrupt(clip_40):
    assert skip_reason(clip_40[: len(clip_40) // 2]) == "corrupt_video"  # the mp4 index (moov) is at the end
    assert skip_reason(np.random.default_rng(0).bytes(5000)) == "corrupt_video"
    assert skip_reason(b"") == "corrupt_video"
    webm = encode(30, codec="libvpx-vp9", fmt="webm", rate=15)
    for cut in (40, len(webm) // 3, len(webm) - 50):  # a cut webm: a shorter clip or a skip, never another error
        try:
            video = decode_video(webm[:cut], small(), FACTOR)
            assert len(video.frames) % 2 == 0
        except SkipSample as exc:
            assert exc.reason in ("corrupt_video", "no_video_frames", "no_video_stream")


@pytest.mark.parametrize("codec, fmt", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("libx264", "matroska")])
def test_damaged_files_give_a_video_or_a_counted_skip(codec, fmt):
    clean = encode(20, codec=codec, fmt=fmt)
    rng = np.random.default_rng(1)
    for trial in range(30):
        data = bytearray(clean)
        for _ in range(rng.integers(1, 20)):
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        if trial % 3 == 0:
            data = data[: rng.integers(1, len(data))]
        try:
            assert len(decode_video(bytes(data), small(), FACTOR).frames) % 2 == 0
        except SkipSample:
            pass


def test_audio_only_file_has_no_video_stream():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    assert skip_reason(buffer.getvalue()) == "no_video_stream"


def test_oversized_clip_is_refused_before_decoding(monkeypatch, clip_40):
    def fail(*args, **kwargs):
        raise AssertionError("decoded an oversized clip")

    monkeypatch.setattr(video_module, "_decode_frames", fail)
    monkeypatch.setattr(video_module, "_decode_nearest", fail)
    limit = 40 * W * H - 1
    monkeypatch.setattr(video_module, "_index_packets", fail)  # the header alone decides
    assert skip_reason(clip_40, small(max_decode_pixels=limit)) == "video_too_large"
    monkeypatch.undo()
    monkeypatch.setattr(video_module, "_decode_frames", fail)
    monkeypatch.setattr(video_module, "_header_frames", lambda *args: 0)  # a header without a count or duration
    assert skip_reason(clip_40, small(max_decode_pixels=limit)) == "video_too_large"  # counted from the packets
    monkeypatch.undo()
    assert len(decode_video(clip_40, small(max_decode_pixels=limit + 1), FACTOR).frames) == 8


def jpeg(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (W, H), (level, level, level)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_frame_folder_samples_at_its_fps_and_decodes_only_the_sampled_frames():
    frames = [jpeg(LEVEL * i) for i in range(10)]  # 2 s at 5 fps
    frames[1] = b"not a jpeg"  # never sampled, so never decoded
    video = video_from_frames(frames, 5.0, small(), FACTOR)
    assert frame_ids(video) == qwen_indices(10, 4) == [0, 3, 6, 9]
    assert video.timestamps == pytest.approx([0, 0.6, 1.2, 1.8])
    assert video.sample_fps == pytest.approx(4 / 10 * 5) and video.frames.shape == (4, 56, 56, 3)
    images = [Image.new("RGB", (W, H), (LEVEL * i,) * 3) for i in range(10)]
    assert frame_ids(video_from_frames(images, 5.0, small(), FACTOR)) == [0, 3, 6, 9]
    frames[3] = b"not a jpeg"
    with pytest.raises(SkipSample, match="corrupt_image"):
        video_from_frames(frames, 5.0, small(), FACTOR)
    for bad, fps, reason in (([], 5.0, "no_video_frames"), (frames, 0.0, "bad_video_fps")):
        with pytest.raises(SkipSample) as err:
            video_from_frames(bad, fps, small(), FACTOR)
        assert err.value.reason == reason
    with pytest.raises(SkipSample) as err:
        video_from_frames(frames, 5.0, small(max_decode_pixels=10 * W * H - 1), FACTOR)
    assert err.value.reason == "video_too_large"


def test_video_settings_compose_as_hydra_overrides():
    from vlm_train.train.config import compose_config

    cfg = compose_config("data.video.fps=1", "data.video.max_frames=32")
    assert isinstance(cfg.data.video, VideoConfig)
    assert cfg.data.video.fps == 1.0 and cfg.data.video.max_frames == 32 and cfg.data.video.min_frames == 4
    with pytest.raises(Exception, match="fsp"):
        compose_config("data.video.fsp=1")
    with pytest.raises(ValueError, match="data.video.fps"):
        compose_config("data.video.fps=0")
    with pytest.raises(ValueError, match="min_frames <= max_frames"):
        VideoConfig(min_frames=8, max_frames=4)


@pytest.mark.parametrize("fallback", [False, True])
def test_decoder_threads_reach_ffmpeg_and_leave_the_frames_unchanged(monkeypatch, clip_40, fallback):
    if fallback:  # the sequential pass sets the decoder the same way
        monkeypatch.setattr(video_module, "_decode_frames", lambda *args: {})
    seen = []
    decoding_stream = video_module._decoding_stream

    def recording(container, threads):
        stream = decoding_stream(container, threads)
        seen.append((stream.codec_context.thread_count, str(stream.codec_context.thread_type)))
        return stream

    monkeypatch.setattr(video_module, "_decoding_stream", recording)
    one = decode_video(clip_40, small(), FACTOR)
    assert seen and all(count == 1 and "NONE" in kind for count, kind in seen), seen
    seen.clear()
    several = decode_video(clip_40, small(decoder_threads=0), FACTOR)  # FFmpeg's own choice
    assert seen and all(count != 1 or "NONE" not in kind for count, kind in seen), seen
    assert np.array_equal(one.frames, several.frames) and one.timestamps == several.timestamps
    with pytest.raises(ValueError, match="data.video.decoder_threads must be >= 0"):
        small(decoder_threads=-1)
