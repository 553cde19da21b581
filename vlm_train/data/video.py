"""Videos as samples carry them: frames sampled from a clip (or a folder of numbered frames), resized, with the
timing the model's temporal positions need.

Sampling and resizing follow qwen-vl-utils' `fetch_video` (`smart_nframes`, `smart_resize`), except that frames are
chosen by timestamp rather than by index, so variable-frame-rate clips are sampled evenly in time.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_train.data.decode import SkipSample, decode_image, to_rgb
from vlm_train.data.image import PatchSpec, smart_resize

if TYPE_CHECKING:
    import av

FRAME_FACTOR = 2  # frames come in pairs: Qwen2.5-VL's temporal patch size
PYAV_MISSING = "install av (PyAV) to read videos: pip install av"
# `VideoFrame.to_ndarray(format=...)` makes a new swscale context for every frame, which cost more than decoding
# small clips (10 of 15 ms for a 4-frame 112 px clip); one reformatter per thread keeps its context while the
# frame size and format stay the same, and gives the same pixels.
_REFORMATTERS = threading.local()


def pyav() -> ModuleType:
    """PyAV, imported when a video file is first decoded rather than with this module: the data config, the loader
    and the trainer import this module, and a machine without av (a bare GPU image) still trains on images and frame
    folders."""
    try:
        import av
    except ImportError as exc:
        raise ModuleNotFoundError(PYAV_MISSING, name="av") from exc
    return av


def _rgb24(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as uint8 RGB [height, width, 3]."""
    if not hasattr(_REFORMATTERS, "rgb24"):
        from av.video.reformatter import VideoReformatter

        _REFORMATTERS.rgb24 = VideoReformatter()
    return _REFORMATTERS.rgb24.reformat(frame, format="rgb24").to_ndarray()


@dataclass
class VideoConfig:
    """`data.video.*`: frame rate and frame-count bounds, and the pixel budgets (qwen-vl-utils' defaults)."""

    fps: float = 2.0  # frames sampled per second of video (before the min/max clamps)
    min_frames: int = 4  # FPS_MIN_FRAMES (rounded up to even)
    max_frames: int = 768  # FPS_MAX_FRAMES (rounded down to even)
    min_pixels: int = 128 * 28 * 28  # VIDEO_MIN_PIXELS, per frame
    max_pixels: int = 768 * 28 * 28  # VIDEO_MAX_PIXELS, per frame
    total_pixels: int = 24576 * 28 * 28  # VIDEO_TOTAL_PIXELS: per-frame max_pixels shrinks to total/nframes*2
    # Clips whose frame count x width x height, read from the container header (and then counted from its packets)
    # before any decoding, exceeds this are skipped as video_too_large: 2**34 is ~4.6 min of 1080p or ~9 min of
    # 720p at 30 fps, which a worker decodes in tens of seconds (every frame up to the last sampled one is decoded).
    max_decode_pixels: int = 2**34
    # FFmpeg threads decoding one clip. 1: the loader's workers decode clips in parallel, and for short clips FFmpeg's
    # default thread pool per clip cost more than the decoding (4-frame 140 x 112 H.264: 5 -> 1.6 ms a clip).
    # 0: FFmpeg's choice (a thread per core), for few workers and long, large videos.
    decoder_threads: int = 1

    def __post_init__(self) -> None:
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"data.video.fps must be a positive number, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames or self.max_frames < FRAME_FACTOR:
            raise ValueError(f"data.video needs 1 <= min_frames <= max_frames, max_frames >= 2, got {self}")
        if not 0 < self.min_pixels <= self.max_pixels or min(self.total_pixels, self.max_decode_pixels) <= 0:
            raise ValueError(f"data.video needs 0 < min_pixels <= max_pixels and positive budgets, got {self}")
        if self.decoder_threads < 0:
            raise ValueError(
                f"data.video.decoder_threads must be >= 0 (0: FFmpeg's choice), got {self.decoder_threads}"
            )


@dataclass
class Video:
    """Sampled frames of one video, uint8 [T, H, W, 3] (T even for the temporal patch of 2; H and W multiples of
    patch_size * merge_size after resizing), the rate they were sampled at (frames per second), and when each frame
    is in the source (seconds)."""

    frames: np.ndarray
    sample_fps: float
    timestamps: list[float]

    def second_per_grid_t(self, temporal_patch_size: int) -> float:
        """Seconds per temporal patch (Qwen2.5-VL's second_per_grid_ts): temporal_patch_size / sample_fps."""
        return temporal_patch_size / self.sample_fps


def smart_nframes(total_frames: int, video_fps: float, cfg: VideoConfig) -> int:
    """Frames to sample, as qwen-vl-utils' smart_nframes; at least FRAME_FACTOR (a shorter clip repeats frames)."""
    min_frames = math.ceil(cfg.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(cfg.max_frames / FRAME_FACTOR) * FRAME_FACTOR
    nframes = total_frames / video_fps * cfg.fps
    nframes = min(max(nframes, min_frames), max_frames, total_frames)
    # qwen-vl-utils raises for clips under FRAME_FACTOR frames; a one-frame clip here gives that frame twice.
    return max(FRAME_FACTOR, math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR)


def frame_size(height: int, width: int, nframes: int, cfg: VideoConfig, factor: int) -> tuple[int, int]:
    """Resized (height, width) of every frame: qwen-vl-utils' per-frame budget under total_pixels, then smart_resize."""
    max_pixels = max(min(cfg.max_pixels, cfg.total_pixels / nframes * FRAME_FACTOR), int(cfg.min_pixels * 1.05))
    # The image smart_resize with factor = patch_size * merge_size; it only differs from qwen-vl-utils' in keeping
    # each side at least one factor when shrinking (qwen-vl-utils could return 0 for aspect ratios near 200).
    spec = PatchSpec(patch_size=factor, merge_size=1, min_pixels=cfg.min_pixels, max_pixels=max_pixels)
    try:
        return smart_resize(height, width, spec)
    except ValueError as exc:  # an empty side or an aspect ratio over 200
        raise SkipSample("bad_video_size", str(exc)) from exc


def sample_plan(times: np.ndarray, video_fps: float, cfg: VideoConfig) -> tuple[np.ndarray, float]:
    """Indices into `times` (sorted, seconds) of the frames to keep, and the sample_fps qwen-vl-utils reports.

    Targets are nframes times evenly spaced over [times[0], times[-1]]; each takes the frame nearest it in time
    (the earlier on a tie). On a constant-rate clip this is qwen-vl-utils' linspace(0, N - 1, nframes).round().
    """
    total = len(times)
    nframes = smart_nframes(total, video_fps, cfg)
    targets = np.linspace(times[0], times[-1], nframes)
    after = np.clip(np.searchsorted(times, targets, side="left"), 1, max(total - 1, 1))
    before = after - 1
    if total == 1:
        chosen = np.zeros(nframes, dtype=np.int64)
    else:
        chosen = np.where(targets - times[before] <= times[after] - targets, before, after)
    sample_fps = nframes / max(total, 1e-6) * video_fps
    return chosen.astype(np.int64), sample_fps


def resize_frame(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3] by antialiased bicubic in float, clamped and rounded.

    This is what qwen-vl-utils' torchvision resize(BICUBIC, antialias=True) computes on a uint8 tensor; we call
    torch.nn.functional.interpolate directly because torchvision may not be installed.
    """
    if pixels.shape[:2] == (height, width):
        return pixels
    with warnings.catch_warnings():  # a PIL image's array is read-only, and it is only read (copied to float)
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0).float()
    y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def decode_video(data: bytes, cfg: VideoConfig, factor: int) -> Video:
    """Decode a video file's bytes to a sampled, resized Video; bad or oversized clips raise SkipSample. Without
    PyAV it raises ModuleNotFoundError saying to install it (a fault of the machine, not of the sample)."""
    av = pyav()
    # Exceptions PyAV raises for broken containers or streams (InvalidDataError is a ValueError; av's EOFError is
    # both an FFmpegError and the builtin); metadata that is not UTF-8 raises UnicodeDecodeError, also a ValueError.
    corrupt = (av.FFmpegError, EOFError, OSError, ValueError)
    try:
        return _decode_video(data, cfg, factor)
    except SkipSample:
        raise
    except corrupt as exc:
        raise SkipSample("corrupt_video", f"{type(exc).__name__}: {exc}") from exc


def video_from_frames(images: list[Image.Image | bytes], fps: float, cfg: VideoConfig, factor: int) -> Video:
    """A Video from frames in order at a constant `fps` (a frame folder); only the sampled frames are decoded."""
    if not images:
        raise SkipSample("no_video_frames", "empty frame folder")
    if not (fps > 0 and math.isfinite(fps)):
        raise SkipSample("bad_video_fps", f"fps={fps}")
    first = _open_frame(images[0])  # the header only: the size bounds the decode work of the whole folder
    if len(images) * first.width * first.height > cfg.max_decode_pixels:
        raise SkipSample("video_too_large", f"{len(images)} frames of {first.width}x{first.height}")
    times = np.arange(len(images), dtype=np.float64) / fps
    chosen, sample_fps = sample_plan(times, fps, cfg)
    height, width = frame_size(first.height, first.width, len(chosen), cfg, factor)
    per_frame = max(1, cfg.max_decode_pixels // len(images))  # a later frame larger than the first is refused
    resized: dict[int, np.ndarray] = {}
    for index in np.unique(chosen).tolist():
        image = images[index]
        image = decode_image(image, per_frame) if isinstance(image, bytes) else to_rgb(image)
        resized[index] = resize_frame(np.asarray(image), height, width)
    frames = np.stack([resized[i] for i in chosen.tolist()])
    return Video(frames, sample_fps, [float(times[i]) for i in chosen.tolist()])


def _open_frame(image: Image.Image | bytes) -> Image.Image:
    if not isinstance(image, bytes):
        return image
    try:
        return Image.open(io.BytesIO(image))
    except Exception as exc:  # PIL raises many types for unreadable headers
        raise SkipSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc


@dataclass
class _Index:
    """What one pass over the packets (no decoding) tells: presentation times and keyframes."""

    pts: list[int]  # presentation timestamps of the frames, sorted (empty: the stream has none)
    keyframes: list[int]  # pts of the keyframes, sorted
    count: int  # packets that hold a frame


def _decode_video(data: bytes, cfg: VideoConfig, factor: int) -> Video:
    av = pyav()
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = _video_stream(container)
        if stream.codec_context is None:  # a codec this FFmpeg build cannot decode (or a corrupt codec id)
            raise SkipSample("unsupported_video_codec", f"no decoder for {stream!r}")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise SkipSample("corrupt_video", "no frame size in the header")
        header_frames = _header_frames(container, stream)
        if header_frames * width * height > cfg.max_decode_pixels:
            raise SkipSample("video_too_large", f"~{header_frames} frames of {width}x{height} (header)")
        max_frames = cfg.max_decode_pixels // (width * height)
        index = _index_packets(container, stream, max_frames, f"{width}x{height}")
        time_base = float(stream.time_base) if stream.time_base else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        # The indexed file, rewound, decodes the frames: opening it again cost as much as decoding a short clip
        # (0.4 of 1.9 ms for a default synthetic one). A file that cannot seek back is opened again.
        rewound = _rewound(container, stream, cfg.decoder_threads)
        return _decoded_video(data, rewound, index, time_base, rate, height, width, cfg, factor)


def _decoded_video(
    data: bytes,
    rewound: tuple[av.container.InputContainer, av.VideoStream] | None,
    index: _Index,
    time_base: float,
    rate: float,
    height: int,
    width: int,
    cfg: VideoConfig,
    factor: int,
) -> Video:
    """The sampled frames of an indexed clip: from `rewound` (its open file, at the start) or from `data` again."""
    if index.count == 0:
        raise SkipSample("no_video_frames", "no video packets")
    if index.pts and time_base > 0:
        times = (np.asarray(index.pts, dtype=np.float64) - index.pts[0]) * time_base
    elif rate > 0:  # no timestamps on the packets: frames in order at the header's rate
        times = np.arange(index.count, dtype=np.float64) / rate
    else:
        raise SkipSample("corrupt_video", "neither timestamps nor a frame rate")
    span = times[-1] - times[0]
    measured = (len(times) - 1) / span if span > 0 else 0.0
    # The header's average rate (what qwen-vl-utils' readers report) where the timestamps agree with it: exact for a
    # constant-rate clip, whose timestamps may be rounded (WebM's are whole milliseconds). Otherwise (variable rate,
    # a wrong header) the clip's mean rate from its own timestamps.
    if rate > 0 and (measured == 0 or abs(measured - rate) <= 0.01 * rate):
        video_fps = rate
    else:
        video_fps = measured or 1.0
    chosen, sample_fps = sample_plan(times, video_fps, cfg)
    out_h, out_w = frame_size(height, width, len(chosen), cfg, factor)

    def convert(frame: av.VideoFrame) -> np.ndarray:
        return resize_frame(_rgb24(frame), out_h, out_w)

    frames: list[np.ndarray] = []
    if index.pts and time_base > 0:
        wanted = [index.pts[i] for i in chosen.tolist()]
        found = _decode_frames(data, sorted(set(wanted)), index.keyframes, convert, cfg.decoder_threads, rewound)
        if len(found) == len(set(wanted)):
            frames = [found[p] for p in wanted]
    if not frames:
        # Packets without timestamps, or decoded frames whose pts differ from their packets': one sequential pass
        # that keeps, for each target time, the decoded frame nearest it.
        use_pts = bool(index.pts) and time_base > 0
        offset = index.pts[0] * time_base if use_pts else 0.0
        rewound = rewound and _rewound(*rewound, cfg.decoder_threads)  # _decode_frames may have read it
        frames = _decode_nearest(data, times[chosen] + offset, rate, use_pts, convert, cfg.decoder_threads, rewound)
    return Video(np.stack(frames), sample_fps, [float(t) for t in times[chosen]])


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    av = pyav()
    for stream in container.streams.video:
        # Cover art (an attached picture) is a one-frame video stream in audio files, not a video.
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise SkipSample("no_video_stream", f"streams: {[s.type for s in container.streams]}")


def _rewound(
    container: av.container.InputContainer, stream: av.VideoStream, threads: int
) -> tuple[av.container.InputContainer, av.VideoStream] | None:
    """The open file sought back to its start (the seek flushes its decoder) and its video stream, whose decoder
    takes `threads` threads unless it is already open; None if the file cannot seek."""
    try:
        container.seek(0, backward=True, any_frame=False)
    except pyav().FFmpegError:
        return None
    return container, _decoding_stream(container, threads)


@contextlib.contextmanager
def _opened(
    data: bytes, threads: int, rewound: tuple[av.container.InputContainer, av.VideoStream] | None
) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """`rewound` as it is (its owner closes it), or `data` opened with a decoder of `threads` threads."""
    if rewound is not None:
        yield rewound
        return
    with pyav().open(io.BytesIO(data), mode="r") as container:
        yield container, _decoding_stream(container, threads)


def _decoding_stream(container: av.container.InputContainer, threads: int) -> av.VideoStream:
    """The video stream, its decoder set to `threads` threads (data.video.decoder_threads; 0: FFmpeg's choice)."""
    stream = _video_stream(container)
    if threads and not stream.codec_context.is_open:  # a rewound file's decoder keeps the threads it opened with
        stream.codec_context.thread_count = threads
        if threads == 1:
            stream.codec_context.thread_type = "NONE"
    return stream


def _header_frames(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """The frame count the header claims: its own count, else duration x rate (0 when it says neither)."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / pyav().time_base
    else:
        return 0
    rate = stream.average_rate or stream.guessed_rate
    return int(duration * float(rate)) if rate else 0


def _index_packets(
    container: av.container.InputContainer, stream: av.VideoStream, max_frames: int, size: str
) -> _Index:
    """Read every packet of the stream (cheap: no decoding), stopping with video_too_large past max_frames."""
    pts: list[int] = []
    keyframes: list[int] = []
    count = 0
    missing_pts = False
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # the demuxer's final flush packet; edit-list pre-roll
            continue
        count += 1
        if count > max_frames:
            raise SkipSample("video_too_large", f"over {max_frames} frames of {size}")
        if packet.pts is None:
            missing_pts = True
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    if missing_pts:  # partial timestamps cannot place every frame: treat the stream as having none
        pts, keyframes = [], []
    return _Index(sorted(pts), sorted(keyframes), count)


def _decode_frames(
    data: bytes,
    wanted: list[int],
    keyframes: list[int],
    convert: Callable[[av.VideoFrame], np.ndarray],
    threads: int = 1,
    rewound: tuple[av.container.InputContainer, av.VideoStream] | None = None,
) -> dict[int, np.ndarray]:
    """The frames with these pts (sorted), converted; frames not met are missing from the result.

    Decodes forward, but seeks to the keyframe before the next wanted frame whenever that keyframe lies past the
    last decoded frame (the frames between would be decoded for nothing).
    """
    found: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    with _opened(data, threads, rewound) as (container, stream):
        frames = None  # the decoded frames, in presentation order, from the last seek on
        position = None  # pts of the last decoded frame
        for target in wanted:
            if target in found:
                continue
            key = _last_at_or_before(keyframes, target)
            if frames is None or (key is not None and position is not None and key > position):
                if key is not None and key > (position if position is not None else keyframes[0]):
                    container.seek(key, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is None:
                    continue
                position = frame.pts
                if frame.pts in wanted_set and frame.pts not in found:
                    found[frame.pts] = convert(frame)
                if frame.pts >= target:
                    break
            else:
                break  # the stream ended
    return found


def _decode_nearest(
    data: bytes,
    targets: np.ndarray,
    rate: float,
    use_pts: bool,
    convert: Callable[[av.VideoFrame], np.ndarray],
    threads: int = 1,
    rewound: tuple[av.container.InputContainer, av.VideoStream] | None = None,
) -> list[np.ndarray]:
    """One sequential pass keeping, for each target time (sorted, seconds), the decoded frame nearest it (the
    earlier on a tie); frame times are their pts, or position / rate when `use_pts` is off."""
    out: list[np.ndarray] = []
    last: tuple[av.VideoFrame, np.ndarray] | None = None  # the frame converted last, reused for repeated picks

    def take(frame: av.VideoFrame) -> None:
        nonlocal last
        if last is None or last[0] is not frame:
            last = (frame, convert(frame))
        out.append(last[1])

    previous: tuple[av.VideoFrame, float] | None = None
    with _opened(data, threads, rewound) as (container, stream):
        for position, frame in enumerate(container.decode(stream)):
            time = frame.time if use_pts else position / rate
            if time is None:
                continue
            while len(out) < len(targets) and targets[len(out)] <= time:
                target = targets[len(out)]
                near_previous = previous is not None and target - previous[1] <= time - target
                take(previous[0] if near_previous else frame)
            if len(out) == len(targets):
                break
            previous = (frame, time)
    while previous is not None and len(out) < len(targets):  # targets past the last decodable frame
        take(previous[0])
    if not out:
        raise SkipSample("no_video_frames", "nothing decodable")
    return out


def _last_at_or_before(values: list[int], value: int) -> int | None:
    """The largest of sorted `values` that is <= value (None if there is none)."""
    i = bisect.bisect_right(values, value)
    return values[i - 1] if i else None
