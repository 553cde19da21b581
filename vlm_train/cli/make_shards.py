"""Write webdataset tar shards from LLaVA-style JSON + an image folder, or from a folder of captioned images.

    vlm-make-shards llava --json llava_instruct.json --images /data/coco --out /data/shards/llava
    vlm-make-shards captions --images /data/my_photos --out /data/shards/photos --samples-per-shard 5000

`llava`: each record {"id", "image": path or [paths] (relative to --images), "conversations": [...]} becomes
`key.jpg` (or `key.0.jpg`, `key.1.jpg`, ...) + `key.json` (the record without "image"); records without an image
become text-only conversations. `captions`: every image with a `.txt` beside it (same stem) becomes `key.<ext>` +
`key.txt`, the caption layout img2dataset writes. Prints JSON: shard pattern for a data config, counts, skips.
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
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # webdataset splits the key at the first dot, so keys must not hold one


def safe_key(value: Any, index: int) -> str:
    """A shard key from a record id: dots, slashes and spaces become '_'; the index keeps keys unique."""
    return f"{index:09d}_{_UNSAFE.sub('_', str(value))[:80]}"


def _image_member(path: str) -> tuple[str, bytes]:
    ext = IMAGE_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if ext is None:
        raise ValueError(f"unsupported image type {path} (use jpg, png or webp)")
    with open(path, "rb") as f:
        return ext, f.read()


def llava_samples(json_path: str, image_root: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Shard samples from a LLaVA-style JSON list; records with a missing image are counted and left out."""
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records with 'conversations'")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            skipped["bad_record"] += 1
            continue
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        sample: dict[str, Any] = {"__key__": safe_key(record.get("id", index), index)}
        try:
            members = [_image_member(os.path.join(image_root, path)) for path in images]
        except FileNotFoundError:
            skipped["missing_image"] += 1
            continue
        except ValueError:
            skipped["unsupported_image"] += 1
            continue
        if len(members) == 1:
            sample[members[0][0]] = members[0][1]
        for i, (ext, data) in enumerate(members if len(members) > 1 else []):
            sample[f"{i}.{ext}"] = data
        meta = {k: v for k, v in record.items() if k != "image"}
        sample["json"] = dumps(meta, ensure_ascii=False).encode("utf-8")
        yield sample


def caption_samples(folder: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Shard samples from images with a same-stem .txt caption beside them (walked in sorted order)."""
    index = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
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
            image_ext, data = _image_member(os.path.join(root, name))
            yield {
                "__key__": safe_key(os.path.relpath(os.path.join(root, stem), folder), index),
                image_ext: data,
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
        required=True,
        help="llava: folder the 'image' paths are relative to; captions: folder of images with .txt captions",
    )
    parser.add_argument("--out", required=True, help="shard path prefix: writes PREFIX-000000.tar, ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-mb", type=float, default=0, help="also close a shard at this size (0: no limit)")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be at least 1")
    skipped: Counter = Counter()
    if args.kind == "llava":
        if not args.json:
            parser.error("llava needs --json")
        samples = llava_samples(args.json, args.images, skipped)
    else:
        samples = caption_samples(args.images, skipped)
    result = write_shards(samples, args.out, args.samples_per_shard, args.max_shard_mb)
    result["skipped"] = dict(skipped)
    result["format"] = "conversation" if args.kind == "llava" else "caption"
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
