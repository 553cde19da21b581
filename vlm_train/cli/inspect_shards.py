"""Inspect webdataset shards: counts by format, a few decoded previews, and every invalid sample with its reason.

    vlm-inspect-shards "/data/shards/llava-{000000..000012}.tar" --previews 3
    vlm-inspect-shards /data/cc3m/00000.tar --format caption --llm-budget 4096

Each sample goes through the training pipeline's own decoding (and, unless --no-encode, its chat template,
tokenizer and image resize), so a sample listed as valid here is one training will use. Videos (`key.mp4`, `key.0.mp4`,
..., `key.frames.000.jpg` + fps) are decoded and sampled as data.video would (--video-fps, --video-max-frames,
--video-max-pixels); previews show each video's sampled frames and size. Prints JSON.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from typing import Any

from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import DEFAULT_FACTOR, parse_sample
from vlm_train.data.image import PatchSpec
from vlm_train.data.packer import PackConfig, Packer
from vlm_train.data.sources import FORMATS, expand_urls
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tar_reader import ShardError, iter_shard
from vlm_train.data.tokenizer import load_tokenizer
from vlm_train.data.video import VideoConfig
from vlm_train.jsonio import dumps


def _preview(sample, encoded) -> dict[str, Any]:
    preview = {
        "key": sample.key,
        "format": sample.task,
        "images": [f"{im.width}x{im.height}" for im in sample.images],
        "videos": [_video_preview(video) for video in sample.videos],
        "turns": [{"role": t.role, "text": t.text[:300]} for t in sample.turns],
    }
    if encoded is not None:
        preview.update(
            tokens=encoded.num_tokens, patches=encoded.num_patches, image_grids=encoded.image_grid_thw.tolist()
        )
    return preview


def _video_preview(video) -> dict[str, Any]:
    """What a decoded video became: sampled frames, their size, the sampling rate and the span they cover."""
    frames, height, width = video.frames.shape[:3]
    return {
        "frames": int(frames),
        "size": f"{width}x{height}",
        "sample_fps": round(float(video.sample_fps), 3),
        "seconds": round(float(video.timestamps[-1] - video.timestamps[0]), 3) if video.timestamps else 0.0,
    }


def inspect(
    urls: list[str],
    fmt: str,
    encoder: Encoder | None,
    packer: Packer | None,
    previews: int,
    max_samples: int,
    max_decode_pixels: int,
    *,
    video: VideoConfig | None = None,
    factor: int = DEFAULT_FACTOR,
) -> dict[str, Any]:
    """Counts, previews and problems of the samples in `urls` (at most `max_samples`, 0: all); videos are sampled by
    `video` (None: data.video's defaults) to multiples of `factor` (patch_size * merge_size)."""
    counts: Counter = Counter()
    video_counts: Counter = Counter()  # valid samples with videos, by format, and the videos they hold
    reasons: Counter = Counter()
    invalid, shard_errors, shown = [], [], []
    samples = 0
    for url in urls:
        try:
            for raw in iter_shard(url):
                if max_samples and samples >= max_samples:
                    break
                samples += 1
                try:
                    sample = parse_sample(raw, "inspect", max_decode_pixels, fmt, video=video, factor=factor)
                    encoded = encoder.encode(sample) if encoder is not None else None
                    if packer is not None and encoded is not None:
                        packer.check(encoded)
                except SkipSample as exc:
                    reasons[exc.reason] += 1
                    invalid.append({"url": url, "key": raw["__key__"], "reason": exc.reason, "detail": str(exc)})
                    continue
                counts[sample.task] += 1
                if sample.videos:
                    video_counts[sample.task] += 1
                    video_counts["videos"] += len(sample.videos)
                if len(shown) < previews:
                    shown.append(_preview(sample, encoded))
        except ShardError as exc:
            reasons["shard_error"] += 1
            shard_errors.append({"url": url, "error": str(exc)})
    return {
        "shards": len(urls),
        "samples": samples,
        "valid": sum(counts.values()),
        "by_format": dict(counts),
        "video_samples_by_format": {k: v for k, v in video_counts.items() if k != "videos"},
        "videos": video_counts["videos"],
        "invalid_by_reason": dict(reasons),
        "invalid": invalid,
        "shard_errors": shard_errors,
        "previews": shown,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", help="shards: a brace pattern, several joined with '::', or one path")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="the source's format (auto: detect)")
    parser.add_argument("--previews", type=int, default=3, help="decoded samples to show")
    parser.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: all)")
    parser.add_argument("--no-encode", action="store_true", help="decode only: skip template, tokenizer and resize")
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' or a local Hugging Face tokenizer folder")
    parser.add_argument("--min-pixels", type=int, default=56 * 56)
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    parser.add_argument("--max-decode-pixels", type=int, default=89_478_485)
    parser.add_argument("--video-fps", type=float, default=VideoConfig.fps, help="data.video.fps")
    parser.add_argument("--video-max-frames", type=int, default=VideoConfig.max_frames, help="data.video.max_frames")
    parser.add_argument("--video-max-pixels", type=int, default=VideoConfig.max_pixels, help="data.video.max_pixels")
    parser.add_argument("--llm-budget", type=int, default=0, help="flag samples longer than this pack budget")
    parser.add_argument("--vit-budget", type=int, default=0, help="flag images with more patches than this")
    parser.add_argument("--allow-pipe", action="store_true", help="accept pipe: URLs (they run shell commands)")
    args = parser.parse_args(argv)

    urls = expand_urls(args.urls, allow_pipe=args.allow_pipe)
    try:
        video = VideoConfig(
            fps=args.video_fps,
            max_frames=args.video_max_frames,
            max_pixels=args.video_max_pixels,
            min_pixels=min(VideoConfig.min_pixels, args.video_max_pixels),
        )
    except ValueError as exc:
        parser.error(str(exc))
    spec = PatchSpec(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    encoder = None
    if not args.no_encode:
        tokenizer = load_tokenizer(args.tokenizer, corpus=corpus_lines())
        encoder = Encoder(tokenizer, spec)
    packer = None
    if args.llm_budget or args.vit_budget:
        packer = Packer(PackConfig(llm_budget=args.llm_budget or 1 << 30, vit_budget=args.vit_budget or 1 << 30))
    result = inspect(
        urls,
        args.format,
        encoder,
        packer,
        args.previews,
        args.max_samples,
        args.max_decode_pixels,
        video=video,
        factor=spec.patch_size * spec.merge_size,
    )
    print(dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
