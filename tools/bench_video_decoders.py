"""Video decoders compared on one core: the frames our sampler picks, decoded and resized, per clip.

The loader's decoder (PyAV, `vlm_train.data.video.decode_video`: one pass over the packets, then a seek to each
sampled frame's keyframe and decoding up to it) against the other readers VLM code bases use, each given the same
clips and the same frame indices and made to return the same resized RGB frames:

- decord (`VideoReader.get_batch`; the reader of qwen-vl-utils' fast path, last released in 2022),
- OpenCV (`cv2.VideoCapture` on a temporary file: grab every frame, retrieve the sampled ones),
- torchcodec (`VideoDecoder`, exact seeking mode).

A reader that is not installed, or does not load, is reported with its error and not timed (torchcodec needs
FFmpeg's shared libraries on the system and a build for the installed torch). Install the others apart from the
project to compare, e.g. `pip install --target /tmp/decoders decord opencv-python-headless` and run with
`PYTHONPATH=/tmp/decoders`. Prints JSON.

    OMP_NUM_THREADS=1 python tools/bench_video_decoders.py --samples 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vlm_train.benchmarking import write_clip
from vlm_train.data.image import PatchSpec
from vlm_train.data.video import VideoConfig, decode_video, frame_size, resize_frame, sample_plan

Reader = Callable[[bytes, str, np.ndarray, tuple[int, int]], np.ndarray]


def read_pyav(data: bytes, path: str, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    del path, indices, size  # decode_video samples and resizes by itself (the same plan, checked below)
    return decode_video(data, VideoConfig(), PatchSpec().factor).frames


def read_decord(data: bytes, path: str, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import decord

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return np.stack([resize_frame(f, *size) for f in frames])


def read_opencv(data: bytes, path: str, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    cv2.setNumThreads(1)
    # One FFmpeg decoding thread, as for the others (OpenCV's default is one per core).
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    wanted, frames, position = set(indices.tolist()), {}, 0
    while position <= indices[-1] and capture.grab():
        if position in wanted:
            ok, bgr = capture.retrieve()
            if ok:
                frames[position] = resize_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), *size)
        position += 1
    capture.release()
    return np.stack([frames[i] for i in indices.tolist()])


def read_torchcodec(data: bytes, path: str, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1)
    frames = decoder.get_frames_at(indices.tolist()).data.permute(0, 2, 3, 1).numpy()
    return np.stack([resize_frame(f, *size) for f in frames])


READERS: dict[str, Reader] = {
    "pyav": read_pyav,
    "decord": read_decord,
    "opencv": read_opencv,
    "torchcodec": read_torchcodec,
}


def plan(data: bytes, fps: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The frame indices and output size our loader uses for a constant-rate clip of `fps`."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        count = sum(1 for p in container.demux(stream) if p.size)
        height, width = stream.codec_context.height, stream.codec_context.width
    cfg = VideoConfig()
    chosen, _ = sample_plan(np.arange(count) / fps, float(fps), cfg)
    return chosen, frame_size(height, width, len(chosen), cfg, PatchSpec().factor)


def bench(clips: list[tuple[bytes, str]], fps: int, readers: list[str]) -> dict[str, dict]:
    plans = [plan(data, fps) for data, _ in clips]
    reference = [read_pyav(data, path, *p) for (data, path), p in zip(clips, plans)]
    results: dict[str, dict] = {}
    for name in readers:
        read = READERS[name]
        try:
            first = read(*clips[0], *plans[0])  # imports the library and warms it up
        except Exception as exc:  # a missing or broken install: say why, time nothing
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        start = time.perf_counter()
        outputs = [read(data, path, *p) for (data, path), p in zip(clips, plans)]
        seconds = time.perf_counter() - start
        # The same frames? Codecs may differ in rounding by a level or two; a wrong frame differs by far more.
        error = max(float(np.abs(o.astype(np.int16) - r).mean()) for o, r in zip([first, *outputs[1:]], reference))
        results[name] = {
            "clips_per_s_one_core": round(len(clips) / seconds, 2),
            "ms_per_clip": round(1000 * seconds / len(clips), 1),
            "mean_abs_diff_from_pyav": round(error, 3),
        }
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="clips")
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--clip-width", type=int, default=640)
    parser.add_argument("--clip-height", type=int, default=360)
    parser.add_argument("--clip-fps", type=int, default=30)
    parser.add_argument("--readers", default=",".join(READERS), help="comma-separated: " + ", ".join(READERS))
    args = parser.parse_args(argv)
    readers = [r for r in args.readers.split(",") if r]
    unknown = sorted(set(readers) - set(READERS))
    if unknown:
        parser.error(f"unknown readers {unknown}; choose from {sorted(READERS)}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_decoders-") as folder:
        clips = []
        for i in range(args.samples):
            path = os.path.join(folder, f"{i}.mp4")
            write_clip(path, args.clip_seconds, args.clip_width, args.clip_height, args.clip_fps, seed=i)
            clips.append((Path(path).read_bytes(), path))
        results = bench(clips, args.clip_fps, readers)
    out = {
        "clips": args.samples,
        "clip": f"{args.clip_seconds:g} s {args.clip_width}x{args.clip_height} H.264 {args.clip_fps} fps",
        "sampled_frames_per_clip": len(plan(clips[0][0], args.clip_fps)[0]),
        "readers": results,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
