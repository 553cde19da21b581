"""A built-in synthetic dataset: coloured shapes on mid-grey backgrounds, captioned and grounded.

It is written as real webdataset tar shards once, into a cache folder keyed by a hash of the
config, so `vlm-train` with no arguments exercises the same loader path as real data.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from PIL import Image, ImageDraw

from vlm_train.data.formats import CAPTION_PROMPT, GROUNDING_PROMPT
from vlm_train.data.grounding import format_box, format_point
from vlm_train.jsonio import dumps

log = logging.getLogger(__name__)

# Bump whenever the rendering or the shard layout changes, so stale caches are not reused.
FORMAT_VERSION = 5
MARKER = "COMPLETE.json"
MIN_OBJECT_PX = 20  # smallest object side; still spans two 14-px patches in each direction
MIN_SLOT_PX = 28  # narrowest horizontal slot one object may get

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 50, 180),
    "orange": (245, 130, 0),
}
# Shapes whose silhouettes differ at the coarse scale of 14-px patches (filled, pointed, hollow, armed):
# a tiny ViT trained from scratch for minutes tells circle from square, or diamond from triangle, poorly.
SHAPES: tuple[str, ...] = ("square", "triangle", "ring", "cross")
BACKGROUND_MEAN = (123, 117, 104)  # 255 x the CLIP image mean


@dataclass
class SyntheticConfig:
    num_train_images: int = 4000
    num_heldout_images: int = 200
    min_side: int = 56
    max_side: int = 168
    # Image sides are drawn from min_side, min_side + side_step, ... <= max_side. With both multiples of the vision
    # tower's patch_size * merge_size (28 for Qwen2-VL) the loader never resizes: shapes keep their proportions
    # (an independent rounding of each side to 28 px squeezed them by up to 25%) and no time goes to resampling.
    side_step: int = 1
    max_objects: int = 2
    images_per_shard: int = 1000
    seed: int = 0
    cache_dir: str = ""  # empty: $VLM_TRAIN_CACHE, else ~/.cache/vlm_train
    # Mixture weights of the two train sources (not part of the shards, so not of the cache key). Captions
    # carry the shape signal the vision tower must learn; grounding answers are twice as long and, mixed 1:1,
    # take most of the tiny model's gradient (held-out caption exact match 0.26 at 1:1, 0.40 at 3:1).
    caption_weight: float = 3.0
    grounding_weight: float = 1.0


# Fields that choose how the shards are read, not what they hold.
_NOT_IN_CACHE_KEY = ("cache_dir", "caption_weight", "grounding_weight")
TASKS = ("caption", "grounding")


@dataclass
class SyntheticShards:
    dir: str
    caption_urls: list[str]
    grounding_urls: list[str]
    heldout_urls: list[str]

    @property
    def train_urls(self) -> list[str]:
        return self.caption_urls + self.grounding_urls


def render_scene(rng: random.Random, cfg: Any) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw one image of 1..max_objects distinct shapes, one per equal-width slot; objects sorted left to right."""
    sides = range(cfg.min_side, cfg.max_side + 1, cfg.side_step)
    width, height = rng.choice(sides), rng.choice(sides)
    # Mid-grey near CLIP's normalisation mean: background patches normalise to about zero, so the objects,
    # not a shared bright background, dominate the image tokens (it was ~85% of their energy when light).
    background = tuple(centre + rng.randint(-12, 12) for centre in BACKGROUND_MEAN)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    n = rng.randint(1, max(1, min(cfg.max_objects, width // MIN_SLOT_PX)))
    kinds = rng.sample(list(itertools.product(COLOURS, SHAPES)), n)
    slot_width = width / n
    objects = []
    for i, (colour, shape) in enumerate(kinds):
        room = int(min(slot_width, height)) - 4  # leave >= 2 px on each side of the slot
        # Large objects (60-90% of the slot) keep shapes readable at 14-px patches.
        side = min(room, max(MIN_OBJECT_PX, int(rng.uniform(0.6, 0.9) * min(slot_width, height))))
        slot_x0 = int(round(i * slot_width))
        slot_x1 = int(round((i + 1) * slot_width))
        x = rng.randint(slot_x0 + 2, slot_x1 - 2 - side)
        y = rng.randint(2, height - 2 - side)
        _draw_shape(draw, shape, x, y, side, COLOURS[colour])
        objects.append({"colour": colour, "shape": shape, "box": [x, y, x + side, y + side]})
    return image, objects


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, fill: tuple[int, int, int]) -> None:
    # PIL coordinates are inclusive, so the shape covers pixels x..x+side-1: its box edges are x and x+side.
    r, b, cx, cy = x + side - 1, y + side - 1, x + (side - 1) / 2, y + (side - 1) / 2
    if shape == "square":
        draw.rectangle([x, y, r, b], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y), (r, b), (x, b)], fill=fill)
    elif shape == "ring":
        # A thin ring (0.12 of the side) and a thick cross (0.4): at 0.22 and 0.3, ring, cross and triangle each
        # covered about half of their box and the default run read a ring right 29% of the time (now 97%).
        # The cross stays the hardest shape; a thin one (0.22) is mistaken for the triangle instead of the square.
        draw.ellipse([x, y, r, b], outline=fill, width=max(2, round(side * 0.12)))
    elif shape == "cross":
        arm = max(3, round(side * 0.4))
        x0, y0 = round(cx - arm / 2), round(cy - arm / 2)
        draw.rectangle([x0, y, x0 + arm - 1, b], fill=fill)
        draw.rectangle([x, y0, r, y0 + arm - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def phrase(obj: dict[str, Any]) -> str:
    """ "red ring" for an object dict."""
    return f"{obj['colour']} {obj['shape']}"


def caption_text(objects: list[dict[str, Any]]) -> str:
    """Every object, left to right: "a red ring" / "a red ring and an orange square"."""
    parts = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {phrase(o)}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def grounding_prompt(object_phrase: str) -> str:
    """The question asked of a grounding sample (the template lives with the sample formats)."""
    return GROUNDING_PROMPT.format(phrase=object_phrase)


def corpus_lines() -> list[str]:
    """Text covering every word and number form of the dataset and its prompts, to train a small tokenizer."""
    kinds = [{"colour": c, "shape": s} for c, s in itertools.product(COLOURS, SHAPES)]
    lines = [CAPTION_PROMPT]
    lines += [caption_text([k]) for k in kinds]
    lines += [caption_text([a, b]) for a, b in itertools.permutations(kinds, 2)]
    lines += [grounding_prompt(phrase(k)) for k in kinds]
    lines += [format_box((i / 10, i / 10, (i + 5) / 20, (i + 5) / 20)) for i in range(10)]
    lines += [format_point((i / 9, 1 - i / 9)) for i in range(10)]
    lines += [" ".join("0123456789"), "0123456789", "( ) , . ?"]
    return lines


def _cache_root(cfg: Any) -> str:
    root = cfg.cache_dir or os.environ.get("VLM_TRAIN_CACHE") or "~/.cache/vlm_train"
    return os.path.abspath(os.path.expanduser(root))


def dataset_dir(cfg: Any) -> str:
    """The cache folder for this config: <cache root>/synthetic-<12-hex hash of the config>."""
    key = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SyntheticConfig) if f.name not in _NOT_IN_CACHE_KEY}
    key["format_version"] = FORMAT_VERSION
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(_cache_root(cfg), f"synthetic-{digest}")


def _check_config(cfg: Any) -> None:
    if cfg.min_side < MIN_SLOT_PX or cfg.min_side > cfg.max_side:
        raise ValueError(
            f"synthetic: need {MIN_SLOT_PX} <= min_side <= max_side, "
            f"got min_side={cfg.min_side}, max_side={cfg.max_side}"
        )
    if not 1 <= cfg.max_objects <= len(COLOURS) * len(SHAPES):
        raise ValueError(f"synthetic: max_objects must be in 1..{len(COLOURS) * len(SHAPES)}, got {cfg.max_objects}")
    if cfg.side_step < 1:
        raise ValueError(f"synthetic: side_step must be >= 1, got {cfg.side_step}")
    if cfg.images_per_shard < 1:
        raise ValueError(f"synthetic: images_per_shard must be >= 1, got {cfg.images_per_shard}")
    if cfg.num_train_images < 0 or cfg.num_heldout_images < 0:
        raise ValueError("synthetic: num_train_images and num_heldout_images must be >= 0")


def _shard_urls(folder: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, f"{split}-*.tar")))


def _write_split(folder: str, split: str, num_images: int, cfg: Any) -> None:
    """Train shards hold one task each (`train-caption-*`, `train-grounding-*`), so the two can be mixed by
    weight as two sources; held-out shards hold both twins of every image (`heldout-*`)."""
    # A seed stream per split, so held-out images never repeat the train ones.
    rng = random.Random(f"vlm_train.synthetic/{split}/{cfg.seed}")
    names = {task: f"{split}-{task}" for task in TASKS} if split == "train" else dict.fromkeys(TASKS, split)
    writers: dict[str, wds.TarWriter] = {}
    for index in range(num_images):
        if index % cfg.images_per_shard == 0:
            for writer in writers.values():
                writer.close()
            # fixed mtime: byte-identical shards per seed
            writers = {
                name: wds.TarWriter(
                    os.path.join(folder, f"{name}-{index // cfg.images_per_shard:06d}.tar"), encoder=False, mtime=0
                )
                for name in set(names.values())
            }
        image, objects = render_scene(rng, cfg)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = buf.getvalue()
        key = f"{split}{index:06d}"
        writers[names["caption"]].write({"__key__": key + "c", "png": png, "txt": caption_text(objects).encode()})
        target = rng.choice(objects)
        meta = {"task": "grounding", "phrase": phrase(target), "box": target["box"], "box_format": "pixels"}
        writers[names["grounding"]].write({"__key__": key + "g", "png": png, "json": dumps(meta).encode()})
    for writer in writers.values():
        writer.close()


def ensure_synthetic_shards(cfg: Any) -> SyntheticShards:
    """Write the synthetic shards for `cfg` once into the cache and return their paths; later calls reuse them."""
    _check_config(cfg)
    final = dataset_dir(cfg)
    if not os.path.exists(os.path.join(final, MARKER)):
        _generate(cfg, final)
    return SyntheticShards(
        dir=final,
        caption_urls=_shard_urls(final, "train-caption"),
        grounding_urls=_shard_urls(final, "train-grounding"),
        heldout_urls=_shard_urls(final, "heldout"),
    )


def _generate(cfg: Any, final: str) -> None:
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    log.info(
        "generating synthetic dataset (%d train + %d held-out images) in %s",
        cfg.num_train_images,
        cfg.num_heldout_images,
        final,
    )
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        _write_split(tmp, "train", cfg.num_train_images, cfg)
        _write_split(tmp, "heldout", cfg.num_heldout_images, cfg)
        info = {
            f.name: getattr(cfg, f.name) for f in dataclasses.fields(SyntheticConfig) if f.name not in _NOT_IN_CACHE_KEY
        }
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(dumps({"format_version": FORMAT_VERSION, "config": info}, indent=2))
        if os.path.isdir(final) and not os.path.exists(os.path.join(final, MARKER)):
            # Only complete folders are ever renamed into place, so this one was damaged by hand: replace it.
            log.warning("replacing incomplete synthetic dataset folder %s", final)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(final, MARKER)):
                raise
            log.info("another process finished %s first; using its shards", final)
            shutil.rmtree(tmp, ignore_errors=True)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote synthetic dataset in %.1fs", time.perf_counter() - start)
