"""Write webdataset tar shards from LLaVA-style JSON + image / video folders, or from a folder of captioned media.

    vlm-make-shards llava --json llava_instruct.json --images /data/coco --out /data/shards/llava
    vlm-make-shards llava --json llava_video_178k.json --videos /data/clips --out /data/shards/llava-video
    vlm-make-shards captions --images /data/my_photos --out /data/shards/photos --samples-per-shard 5000

`llava`: each record {"id", "image": path or [paths] (relative to --images), "conversations": [...]} becomes
`key.jpg` (or `key.0.jpg`, `key.1.jpg`, ...) + `key.json` (the record without "image"); records without an image
become text-only conversations. A "video" (path or [paths], relative to --videos; LLaVA-Video / ShareGPT4Video)
becomes `key.mp4` (the file's own extension: mp4, webm, mkv, avi, mov), or `key.0.mp4`, `key.1.webm`, ...; its
turns refer to it with `<video>` (a record with videos and no image whose turns say `<image>`, LLaVA-Video-178K's
habit, has them rewritten to `<video>`). A record {"image" or "video", "caption": "..."} without "conversations"
becomes a caption sample (`key.<ext>` + `key.txt`). `captions`: every image or video with a `.txt` beside it (same
stem) becomes `key.<ext>` + `key.txt`, the caption layout img2dataset writes. The file's bytes are copied as they are.
Prints JSON: shard pattern for a data config, counts, skips.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import webdataset as wds

from vlm_train.jsonio import dumps

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
VIDEO_EXTENSIONS = {".mp4": "mp4", ".m4v": "mp4", ".webm": "webm", ".mkv": "mkv", ".avi": "avi", ".mov": "mov"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # webdataset splits the key at the first dot, so keys must not hold one


def safe_key(value: Any, index: int) -> str:
    """A shard key from a record id: dots, slashes and spaces become '_'; the index keeps keys unique."""
    return f"{index:09d}_{_UNSAFE.sub('_', str(value))[:80]}"


def _member(path: str, kind: str) -> tuple[str, bytes]:
    """A file as a shard member (kind: image | video): its extension (the loader picks images and videos by member
    name) and its bytes, unchanged; a type the loader does not read is an error naming the file."""
    extensions = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    ext = extensions.get(os.path.splitext(path)[1].lower())
    if ext is None:
        raise ValueError(f"unsupported {kind} type {path} (use one of {', '.join(sorted(set(extensions.values())))})")
    with open(path, "rb") as f:
        return ext, f.read()


def _members(paths: list[str], root: str, kind: str) -> tuple[list[tuple[str, bytes]], str]:
    """The members of a record's files of one kind, or none and the reason to skip the record."""
    try:
        return [_member(os.path.join(root, path), kind) for path in paths], ""
    except FileNotFoundError:
        return [], f"missing_{kind}"
    except ValueError:
        return [], f"unsupported_{kind}"


def _paths(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _add_members(sample: dict[str, Any], members: list[tuple[str, bytes]]) -> None:
    """`ext` for one member, `0.ext`, `1.ext`, ... for several (in the record's order: the placeholders' order)."""
    if len(members) == 1:
        sample[members[0][0]] = members[0][1]
    for i, (ext, data) in enumerate(members if len(members) > 1 else []):
        sample[f"{i}.{ext}"] = data


def _video_placeholders(conversations: list[Any]) -> list[Any]:
    """LLaVA-Video-178K marks its video with `<image>`: the loader reads `<video>` for a video, so rewrite them."""
    out = []
    for message in conversations:
        if isinstance(message, dict) and isinstance(message.get("value"), str):
            message = {**message, "value": message["value"].replace("<image>", "<video>")}
        out.append(message)
    return out


def llava_samples(
    json_path: str, image_root: str, skipped: Counter, video_root: str | None = None, tasks: Counter | None = None
) -> Iterator[dict[str, Any]]:
    """Shard samples from a LLaVA-style JSON list (conversations, or captions of an image or video); records with a
    missing image or video are counted and left out; `tasks` counts the samples written by format."""
    tasks = Counter() if tasks is None else tasks
    video_root = image_root if video_root is None else video_root
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records with 'conversations'")
    for index, record in enumerate(records):
        is_caption = (
            isinstance(record, dict) and "conversations" not in record and isinstance(record.get("caption"), str)
        )
        if not isinstance(record, dict) or not (isinstance(record.get("conversations"), list) or is_caption):
            skipped["bad_record"] += 1
            continue
        images, videos = _paths(record.get("image")), _paths(record.get("video"))
        sample: dict[str, Any] = {"__key__": safe_key(record.get("id", index), index)}
        image_members, problem = _members(images, image_root, "image")
        video_members, problem = _members(videos, video_root, "video") if not problem else ([], problem)
        if problem:
            skipped[problem] += 1
            continue
        _add_members(sample, image_members)
        _add_members(sample, video_members)
        meta = {k: v for k, v in record.items() if k not in ("image", "video")}
        if is_caption:
            caption = meta.pop("caption").strip()
            if not caption or len(image_members) + len(video_members) != 1:
                skipped["bad_caption_record"] += 1  # a caption sample is one image or one video and a caption
                continue
            sample["txt"] = caption.encode("utf-8")
        elif videos and not images:
            meta["conversations"] = _video_placeholders(meta["conversations"])
        if meta or not is_caption:
            sample["json"] = dumps(meta, ensure_ascii=False).encode("utf-8")
        tasks["caption" if is_caption else "conversation"] += 1
        yield sample


def caption_samples(folder: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Shard samples from images or videos with a same-stem .txt caption beside them (walked in sorted order)."""
    index = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS and ext.lower() not in VIDEO_EXTENSIONS:
                continue
            caption_path = os.path.join(root, stem + ".txt")
            if not os.path.exists(caption_path):
                skipped["missing_caption"] += 1
                continue
            with open(caption_path, encoding="utf-8") as f:
                caption = f.read().strip()
            if not caption:
                skipped["empty_caption"] += 1
                continue
            path = os.path.join(root, name)
            member_ext, data = _member(path, "video" if ext.lower() in VIDEO_EXTENSIONS else "image")
            yield {
                "__key__": safe_key(os.path.relpath(os.path.join(root, stem), folder), index),
                member_ext: data,
                "txt": caption.encode("utf-8"),
            }
            index += 1


def write_shards(samples: Iterator[dict[str, Any]], out: str, samples_per_shard: int, max_shard_mb: float) -> dict:
    """Write `samples` to out-000000.tar, out-000001.tar, ...; a shard closes at either limit."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    pattern = os.path.abspath(out) + "-%06d.tar"
    max_size = int(max_shard_mb * 1024**2) if max_shard_mb > 0 else 1 << 62
    count = 0
    with wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=max_size, verbose=0, encoder=False, mtime=0
    ) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
        shards = sink.shard
    if count == 0:
        os.remove(pattern % 0)  # the writer opens its first shard up front
        shards = 0
    last = max(shards - 1, 0)
    return {
        "shards": shards,
        "samples": count,
        "urls": f"{os.path.abspath(out)}-{{{0:06d}..{last:06d}}}.tar" if shards > 1 else pattern % 0,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["llava", "captions"], help="input layout")
    parser.add_argument("--json", help="llava: the JSON list of records")
    parser.add_argument(
        "--images",
        help="llava: folder the 'image' paths are relative to; captions: folder of images / videos with .txt captions",
    )
    parser.add_argument(
        "--videos", help="llava: folder the 'video' paths are relative to (default: --images); captions: as --images"
    )
    parser.add_argument("--out", required=True, help="shard path prefix: writes PREFIX-000000.tar, ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-mb", type=float, default=0, help="also close a shard at this size (0: no limit)")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be at least 1")
    if not (args.images or args.videos):
        parser.error("give --images and / or --videos")
    if args.kind == "captions" and args.images and args.videos:
        parser.error("captions reads one folder: give --images or --videos")
    skipped: Counter = Counter()
    tasks: Counter = Counter()
    if args.kind == "llava":
        if not args.json:
            parser.error("llava needs --json")
        samples = llava_samples(args.json, args.images or args.videos, skipped, args.videos, tasks)
    else:
        samples = caption_samples(args.images or args.videos, skipped)
    result = write_shards(samples, args.out, args.samples_per_shard, args.max_shard_mb)
    result["skipped"] = dict(skipped)
    # a llava JSON may mix conversations and caption records: then the loader tells them apart by their members
    result["format"] = (
        "caption" if args.kind == "captions" else ("auto" if len(tasks) > 1 else max(tasks, default="conversation"))
    )
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
