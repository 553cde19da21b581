"""Loader throughput: samples/s of decode -> resize -> patchify -> tokenize -> pack on ~512 px JPEG caption shards.

Writes the shards into a temporary folder (or --dir), then times the real loader (PackedLoader) end to end with
--workers worker processes (0: one core, in this process), plus each stage alone on one core. Prints JSON, with the
machine's load average before and after (other processes on the cores make the figures lower).

    OMP_NUM_THREADS=1 python tools/bench_loader.py --samples 1000 --workers 0
    OMP_NUM_THREADS=1 python tools/bench_loader.py --samples 1000 --workers 0 --resize torch

--video times one core on video instead: decode (PyAV, only the sampled frames converted) + sample + resize, then
patchify, on H.264 clips written with PyAV (default 10 s of 640x360 at 30 fps, moving shapes over a gradient):

    OMP_NUM_THREADS=1 python tools/bench_loader.py --video --samples 8
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from vlm_train.benchmarking import write_clip
from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import parse_sample
from vlm_train.data.image import RESIZE_METHODS, PatchSpec, patchify, resize_image, smart_resize
from vlm_train.data.loader import PackedStream, Source, build_loader
from vlm_train.data.packer import Packer
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tar_reader import iter_shard
from vlm_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from vlm_train.jsonio import dumps

WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "large",
    "small",
    "circle",
    "square",
    "photo",
    "of",
    "the",
    "with",
    "on",
    "in",
    "near",
    "old",
    "new",
    "bright",
    "dark",
]


def photo_like(rng: np.random.Generator, side: int) -> Image.Image:
    """A ~side px image with smooth gradients, shapes and grain, so JPEG sizes resemble photos (tens of kB)."""
    width, height = (int(side * f) for f in rng.uniform(0.8, 1.2, size=2))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(20, 90) + c) * np.cos(y / rng.uniform(20, 90)) for c in range(3)], -1)
    pixels = (127 + 90 * base + rng.normal(0, 6, (height, width, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        box = [x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def write_shards(folder: str, samples: int, per_shard: int, side: int, seed: int = 0) -> list[str]:
    """Caption shards (key.jpg + key.txt) of photo-like JPEGs at quality 90."""
    rng = np.random.default_rng(seed)
    urls = []
    for start in range(0, samples, per_shard):
        url = os.path.join(folder, f"bench-{start // per_shard:05d}.tar")
        with wds.TarWriter(url) as writer:
            for i in range(start, min(start + per_shard, samples)):
                buffer = io.BytesIO()
                photo_like(rng, side).save(buffer, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 30))))
                writer.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "txt": caption})
        urls.append(url)
    return urls


def _stages(urls: list[str], encoder: Encoder, cfg: DataConfig, limit: int) -> dict[str, float]:
    """Milliseconds per sample of each stage alone, in this process (one core)."""
    raws = []
    for url in urls:
        raws += list(iter_shard(url))[: limit - len(raws)]
    timings = dict.fromkeys(["decode", "resize", "patchify", "tokenize", "encode", "pack"], 0.0)

    def timed(stage: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[stage] += time.perf_counter() - start
        return result

    packer = Packer(cfg.pack)
    spec = encoder.spec
    for raw in raws:
        sample = timed("decode", parse_sample, raw, "bench", cfg.image.max_decode_pixels)
        image = sample.images[0]
        height, width = smart_resize(image.height, image.width, spec)
        pixels = timed("resize", resize_image, image, height, width, spec.resize)
        timed("patchify", patchify, pixels, spec)
        for turn in sample.turns:
            timed("tokenize", lambda text: encoder.tokenizer.encode(text, add_special_tokens=False), turn.text)
        encoded = timed("encode", encoder.encode, sample)  # resize + patchify + template + tokenize together
        for pack in timed("pack", packer.add, encoded):
            timed("pack", collate, pack)
    result = {f"{k}_ms_per_sample": round(1000 * v / len(raws), 3) for k, v in timings.items()}
    result["note"] = (
        "encode = resize + patchify + chat template + tokenize; pack = packer + collate; "
        "resize includes the PIL image to numpy copy"
    )
    return result


def bench_video(args: argparse.Namespace) -> dict:
    """One core: decode + sample + resize (decode_video), then patchify (video_to_patches), per clip."""
    from vlm_train.data.video import VideoConfig, decode_video
    from vlm_train.data.video_patches import video_to_patches

    spec = PatchSpec()
    cfg = VideoConfig()
    with tempfile.TemporaryDirectory(prefix="bench_video-") as folder:
        clips = []
        for i in range(args.samples):
            path = os.path.join(folder, f"{i}.mp4")
            write_clip(path, args.clip_seconds, args.clip_width, args.clip_height, args.clip_fps, seed=i)
            with open(path, "rb") as f:
                clips.append(f.read())
    load_before = os.getloadavg()[0]
    decode = patchify_s = 0.0
    frames = patches = 0
    for data in clips:
        start = time.perf_counter()
        video = decode_video(data, cfg, spec.factor)
        middle = time.perf_counter()
        rows, _ = video_to_patches(video, spec)
        decode += middle - start
        patchify_s += time.perf_counter() - middle
        frames += video.frames.shape[0]
        patches += rows.shape[0]
    seconds = decode + patchify_s
    n = len(clips)
    source_frames = n * int(args.clip_seconds * args.clip_fps)
    return {
        "mode": "video",
        "clips": n,
        "clip": f"{args.clip_seconds:g} s {args.clip_width}x{args.clip_height} H.264 {args.clip_fps} fps",
        "mean_clip_kb": round(sum(len(c) for c in clips) / n / 1024, 1),
        "sampled_frames_per_clip": frames / n,
        "frame_size": list(video.frames.shape[1:3]),
        "patches_per_clip": patches / n,
        "samples_per_s_one_core": round(n / seconds, 2),
        "sampled_frames_per_s_one_core": round(frames / seconds, 1),
        "source_frames_per_s_one_core": round(source_frames / seconds, 1),
        "decode_sample_resize_ms_per_clip": round(1000 * decode / n, 1),
        "patchify_ms_per_clip": round(1000 * patchify_s / n, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000, help="samples written (and read once)")
    parser.add_argument("--per-shard", type=int, default=250, help="samples per shard")
    parser.add_argument("--side", type=int, default=512, help="typical image side in pixels (0.8x-1.2x per side)")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (0: this process, one core)")
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28, help="image area cap (Qwen2-VL's default)")
    parser.add_argument("--llm-budget", type=int, default=8192, help="LLM tokens per pack")
    parser.add_argument("--vit-budget", type=int, default=32768, help="ViT patches per pack")
    parser.add_argument(
        "--resize",
        default="pil",
        choices=RESIZE_METHODS,
        help="pil: HF's pixels exactly; torch: SIMD uint8 resize, ~2.5x faster, +-1 on some values",
    )
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' or a local Hugging Face tokenizer folder")
    parser.add_argument("--dir", default="", help="shard folder to reuse or fill (default: a temporary one)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    parser.add_argument("--video", action="store_true", help="time video decode + sample + patchify on one core")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="--video: clip length")
    parser.add_argument("--clip-width", type=int, default=640, help="--video: clip width")
    parser.add_argument("--clip-height", type=int, default=360, help="--video: clip height")
    parser.add_argument("--clip-fps", type=int, default=30, help="--video: clip frame rate")
    args = parser.parse_args(argv)
    if args.video:
        result = bench_video(args)
        print(dumps(result, indent=2))
        return result

    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        urls = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("bench-"))
        if not urls:
            urls = write_shards(folder, args.samples, args.per_shard, args.side)
        cfg = DataConfig(num_workers=args.workers, shuffle_buffer=64)
        cfg.image.max_pixels = args.max_pixels
        cfg.pack.llm_budget, cfg.pack.vit_budget, cfg.pack.buffer_size = args.llm_budget, args.vit_budget, 32
        tokenizer = build_tiny_tokenizer(corpus_lines()) if args.tokenizer == "tiny" else load_tokenizer(args.tokenizer)
        spec = PatchSpec(min_pixels=cfg.image.min_pixels, max_pixels=cfg.image.max_pixels, resize=args.resize)
        encoder = Encoder(tokenizer, spec)
        total = sum(1 for url in urls for _ in iter_shard(url))
        loader = build_loader(
            PackedStream([Source("bench", urls)], encoder, cfg, seed=0, rank=0, world_size=1), args.workers
        )
        load_before = os.getloadavg()[0]
        next(loader)  # worker start-up and buffer fill are not throughput
        start, samples, tokens, patches = time.perf_counter(), 0, 0, 0
        while samples < total:
            pack = next(loader)
            samples += pack.num_samples
            tokens += pack.num_tokens
            patches += pack.num_patches
        seconds = time.perf_counter() - start
        loader.close()
        result = {
            "samples": samples,
            "seconds": round(seconds, 3),
            "workers": args.workers,
            "cores_used": max(args.workers, 1),
            "samples_per_s": round(samples / seconds, 1),
            "samples_per_s_per_worker": round(samples / seconds / max(args.workers, 1), 1),
            "resize": args.resize,
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
            "cpus": os.cpu_count(),
            "tokens_per_s": round(tokens / seconds),
            "patches_per_s": round(patches / seconds),
            "mean_jpeg_kb": round(sum(os.path.getsize(u) for u in urls) / total / 1024, 1),
            "mean_image_patches": round(patches / samples, 1),
        }
        if not args.no_stages:
            result["stages_one_core"] = _stages(urls, encoder, cfg, limit=min(total, 200))
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
