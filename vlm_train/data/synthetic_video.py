"""A built-in synthetic video dataset: the image set's coloured shapes, each moving left, right, up or down.

A clip's caption names every shape with its direction ("a red square moving left and a blue ring moving up"). Any
one frame shows colour and shape, but only the order of the frames shows the direction: a model that gets the
direction right has learned time. Clips are real H.264 mp4 files (PyAV, libx264) in webdataset tar shards,
`key.mp4` + `key.txt` (the caption layout with the image replaced by a video) + `key.json` (the attributes, for
evaluation and inspection), written once into a cache folder keyed by a hash of the config, like the image set.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from vlm_train.data.synthetic import BACKGROUND_MEAN, COLOURS, SHAPES, corpus_lines
from vlm_train.data.synthetic import _draw_shape as draw_shape  # the image set's renderer, shared on purpose
from vlm_train.data.synthetic import caption_text as image_caption_text
from vlm_train.jsonio import dumps

log = logging.getLogger(__name__)

# Bump whenever the rendering, the encoding or the shard layout changes, so stale caches are not reused.
FORMAT_VERSION = 2
MARKER = "COMPLETE.json"
# Unit steps (dx, dy) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MARGIN_PX = 2  # every shape stays this far inside the frame on every frame
GAP_PX = 4  # between the areas two shapes sweep over the clip: they never touch or hide each other
# Shapes' centres differ by at least this much across the frame on the first and the last frame, in the same order,
# so "left to right" (the caption's order) is the same on every frame and readable at 14-px patches.
MIN_ORDER_GAP_PX = 16
PLACEMENT_TRIES = 200  # random layouts tried before a clip drops to one shape fewer


@dataclass
class SyntheticVideoConfig:
    num_train_clips: int = 4000
    num_heldout_clips: int = 200
    # The defaults were chosen by held-out caption exact match after 1,200 steps of the tiny model (one core per run,
    # 2026-11-29; docs/data.md has the table). Shape was always the attribute learned last, direction the one that
    # varied most between seeds.
    # Frames of width x height, even (yuv420p) and multiples of patch_size * merge_size (28), so the loader never
    # resizes them: with data.video.fps equal to `fps` every frame is kept. 140 x 112 px (5 x 4 merged tokens a
    # temporal patch) leaves room for two shapes of 40-52 px that each move a whole merged token.
    width: int = 140
    height: int = 112
    # 4 frames (2 temporal patches of 2) at 4 fps: the patches are 0.5 s apart, M-RoPE times 0 and 1. Fewer tokens a
    # clip than 6 or 8 frames, so more clips a step (6 frames with shapes moving every frame: 0.83 at 1,640 steps).
    frames: int = 4
    fps: int = 4
    min_object_px: int = 40  # shape sides are drawn from [min_object_px, max_object_px]
    max_object_px: int = 52
    # Pixels per move, drawn per shape: 28-34 px, at least one merged token (28 px), so the LLM sees the shape in
    # different tokens at the two times (moves of 14-20 px: direction 0.85 at 1,200 steps; 28-34 px: 0.99-1.0).
    min_speed: int = 28
    max_speed: int = 34
    max_objects: int = 2
    # Frames each place is held for: 1 moves the shapes every frame; 2 moves them once per temporal patch (the
    # patch's two frames are equal), so each patch shows the shapes sharply and only the order of the patches, their
    # M-RoPE times, tells the direction. Moving every frame blurs the shapes inside a patch (6-8 px a frame: shape
    # 0.91-0.93 at 1,200 steps; 4-6 px: shape 0.975 but direction 0.69).
    hold_frames: int = 2
    crf: int = 10  # x264 quality (0: lossless, 23: its default): low, so colours and thin rings survive yuv420p
    clips_per_shard: int = 1000
    seed: int = 0
    cache_dir: str = ""  # empty: $VLM_TRAIN_CACHE, else ~/.cache/vlm_train


_NOT_IN_CACHE_KEY = ("cache_dir",)  # fields that choose where the shards are, not what they hold


@dataclass
class SyntheticVideoShards:
    dir: str
    caption_urls: list[str]
    heldout_urls: list[str]


def positions(cfg: Any) -> int:
    """The places a shape takes in a clip: one per `hold_frames` frames."""
    return -(-cfg.frames // cfg.hold_frames)


def _path(obj: dict[str, Any], step: int) -> tuple[int, int]:
    """Top-left corner of an object at its `step`-th place."""
    dx, dy = DIRECTIONS[obj["direction"]]
    x, y = obj["start"]
    return x + dx * obj["speed"] * step, y + dy * obj["speed"] * step


def _swept_box(obj: dict[str, Any], steps: int) -> tuple[int, int, int, int]:
    """The box an object covers over its `steps` places (x0, y0, x1, y1), exclusive ends."""
    (x0, y0), (x1, y1) = _path(obj, 0), _path(obj, steps - 1)
    side = obj["side"]
    return min(x0, x1), min(y0, y1), max(x0, x1) + side, max(y0, y1) + side


def _centre_x(obj: dict[str, Any], step: int) -> float:
    return _path(obj, step)[0] + obj["side"] / 2


def _random_object(rng: random.Random, colour: str, shape: str, direction: str, cfg: Any) -> dict[str, Any] | None:
    """An object moving `direction` whose whole path stays inside the frame, or None when its draw does not fit."""
    side = rng.randint(cfg.min_object_px, cfg.max_object_px)
    speed = rng.randint(cfg.min_speed, cfg.max_speed)
    dx, dy = DIRECTIONS[direction]
    travel = speed * (positions(cfg) - 1)
    # The start range along each axis keeps the first and the last frame (so every frame) inside the margins.
    x_lo, x_hi = MARGIN_PX + max(0, -dx) * travel, cfg.width - MARGIN_PX - side - max(0, dx) * travel
    y_lo, y_hi = MARGIN_PX + max(0, -dy) * travel, cfg.height - MARGIN_PX - side - max(0, dy) * travel
    if x_lo > x_hi or y_lo > y_hi:
        return None
    start = [rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)]
    return {"colour": colour, "shape": shape, "direction": direction, "side": side, "speed": speed, "start": start}


def _apart(a: dict[str, Any], b: dict[str, Any], steps: int) -> bool:
    """No overlap of the swept areas (with a gap), and one clear left-to-right order on the first and last frame."""
    ax0, ay0, ax1, ay1 = _swept_box(a, steps)
    bx0, by0, bx1, by1 = _swept_box(b, steps)
    disjoint = ax1 + GAP_PX <= bx0 or bx1 + GAP_PX <= ax0 or ay1 + GAP_PX <= by0 or by1 + GAP_PX <= ay0
    first = _centre_x(b, 0) - _centre_x(a, 0)
    last = _centre_x(b, steps - 1) - _centre_x(a, steps - 1)
    ordered = min(abs(first), abs(last)) >= MIN_ORDER_GAP_PX and (first > 0) == (last > 0)
    return disjoint and ordered


def place_objects(rng: random.Random, cfg: Any) -> list[dict[str, Any]]:
    """1..max_objects distinct (colour, shape) kinds with sizes, directions, speeds and starts, left to right."""
    n = rng.randint(1, cfg.max_objects)
    kinds = rng.sample(list(itertools.product(COLOURS, SHAPES)), n)
    # Directions are drawn once, before the layout: redrawing them with it favoured the ones that fit more easily
    # (two shapes moving sideways need more room), and the caption's directions would not be uniform.
    directions = [rng.choice(list(DIRECTIONS)) for _ in kinds]
    while True:
        for _ in range(PLACEMENT_TRIES):
            objects = [_random_object(rng, c, s, d, cfg) for (c, s), d in zip(kinds, directions)]
            if all(o is not None for o in objects) and all(
                _apart(a, b, positions(cfg)) for a, b in itertools.combinations(objects, 2)
            ):
                return sorted(objects, key=lambda o: _centre_x(o, 0))
        if len(kinds) == 1:
            raise ValueError(f"synthetic_video: a {cfg.max_object_px}-px shape cannot move within the frame: {cfg}")
        kinds, directions = kinds[:-1], directions[:-1]  # the frame is too small for this many shapes this way


def render_clip(rng: random.Random, cfg: Any) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Frames (uint8 [height, width, 3]) of one clip and its objects, left to right."""
    objects = place_objects(rng, cfg)
    # A mid-grey background near CLIP's mean, as in the image set, so the shapes dominate the vision tokens.
    background = tuple(centre + rng.randint(-12, 12) for centre in BACKGROUND_MEAN)
    frames = []
    for t in range(cfg.frames):
        image = Image.new("RGB", (cfg.width, cfg.height), background)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            x, y = _path(obj, t // cfg.hold_frames)
            draw_shape(draw, obj["shape"], x, y, obj["side"], COLOURS[obj["colour"]])
        frames.append(np.asarray(image))
    return frames, objects


def encode_mp4(frames: list[np.ndarray], fps: int, crf: int) -> bytes:
    """H.264 (libx264, yuv420p) in an mp4 container, in memory."""
    import av  # PyAV only where clips are written: importing the data config stays light

    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread: x264's output depends on its thread count, and the cache promises the same bytes per seed.
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def object_phrase(obj: dict[str, Any]) -> str:
    """ "a red ring moving left" ("an" before a vowel)."""
    article = "an" if obj["colour"][0] in "aeiou" else "a"
    return f"{article} {obj['colour']} {obj['shape']} moving {obj['direction']}"


def caption_text(objects: list[dict[str, Any]]) -> str:
    """Every object, left to right, joined as the image set joins them: "a, b and c"."""
    parts = [object_phrase(o) for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_WORD = "|".join
_OBJECT = re.compile(
    rf"\b(?P<colour>{_WORD(COLOURS)}) (?P<shape>{_WORD(SHAPES)})(?: moving (?P<direction>{_WORD(DIRECTIONS)}))?\b"
)


def caption_objects(text: str) -> list[dict[str, str]]:
    """The objects a synthetic caption (image or video set) names, in order: colour, shape and, in a video caption,
    direction. Other text is skipped, so a garbled answer still gives the objects it does name."""
    return [{k: v for k, v in m.groupdict().items() if v is not None} for m in _OBJECT.finditer(text)]


def parse_caption(text: str) -> list[dict[str, str]] | None:
    """The objects of a caption written by either synthetic set, or None for any other text (a real caption that
    happens to say "red square" is not one: the text must be exactly what the set would have written)."""
    objects = caption_objects(text)
    moving = ["direction" in o for o in objects]
    if not objects or any(moving) != all(moving):
        return None
    written = caption_text(objects) if all(moving) else image_caption_text(objects)
    return objects if written == text.strip() else None


def video_corpus_lines() -> list[str]:
    """The image set's tokenizer corpus plus every video caption: the tiny tokenizer of a run with the video set.

    A superset, so image captions still tokenize well when both sets are mixed; the image set alone keeps
    `corpus_lines()` (and so its tokenizer) unchanged.
    """
    kinds = [{"colour": c, "shape": s, "direction": d} for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]
    lines = corpus_lines()  # it holds CAPTION_PROMPT, which video captions are asked with too
    lines += [caption_text([k]) for k in kinds]
    # All ordered pairs (96 x 95): BPE learns merges from frequencies, and these are the sentences it will see.
    lines += [caption_text([a, b]) for a, b in itertools.permutations(kinds, 2)]
    return lines


def _cache_root(cfg: Any) -> str:
    root = cfg.cache_dir or os.environ.get("VLM_TRAIN_CACHE") or "~/.cache/vlm_train"
    return os.path.abspath(os.path.expanduser(root))


def _cache_key(cfg: Any) -> dict[str, Any]:
    fields = dataclasses.fields(SyntheticVideoConfig)
    return {f.name: getattr(cfg, f.name) for f in fields if f.name not in _NOT_IN_CACHE_KEY}


def dataset_dir(cfg: Any) -> str:
    """The cache folder for this config: <cache root>/synthetic-video-<12-hex hash of the config>."""
    key = {**_cache_key(cfg), "format_version": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(_cache_root(cfg), f"synthetic-video-{digest}")


def _check_config(cfg: Any) -> None:
    if cfg.width % 2 or cfg.height % 2 or min(cfg.width, cfg.height) <= 0:
        raise ValueError(f"synthetic_video: width and height must be even (yuv420p), got {cfg.width}x{cfg.height}")
    if cfg.frames < 2 or cfg.fps < 1:
        raise ValueError(f"synthetic_video: need frames >= 2 and fps >= 1, got {cfg.frames}, {cfg.fps}")
    if not 1 <= cfg.hold_frames < cfg.frames:
        raise ValueError(f"synthetic_video: hold_frames must be in 1..frames - 1, got {cfg.hold_frames}")
    if not 1 <= cfg.min_object_px <= cfg.max_object_px or not 1 <= cfg.min_speed <= cfg.max_speed:
        raise ValueError("synthetic_video: need 1 <= min_object_px <= max_object_px and 1 <= min_speed <= max_speed")
    # The largest, fastest shape must fit its path in the frame along both axes (a clip may draw it either way).
    needed = cfg.max_object_px + cfg.max_speed * (positions(cfg) - 1) + 2 * MARGIN_PX
    if needed > min(cfg.width, cfg.height):
        raise ValueError(
            f"synthetic_video: a {cfg.max_object_px}-px shape moving {cfg.max_speed} px {positions(cfg) - 1} times "
            f"needs {needed} px, the frame is {cfg.width}x{cfg.height}"
        )
    if not 1 <= cfg.max_objects <= len(COLOURS) * len(SHAPES):
        raise ValueError(f"synthetic_video: max_objects must be in 1..{len(COLOURS) * len(SHAPES)}")
    if not 0 <= cfg.crf <= 51:
        raise ValueError(f"synthetic_video: crf must be in 0..51, got {cfg.crf}")
    if cfg.clips_per_shard < 1 or cfg.num_train_clips < 0 or cfg.num_heldout_clips < 0:
        raise ValueError("synthetic_video: clips_per_shard must be >= 1 and the clip counts >= 0")


def _shard_urls(folder: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, f"{split}-*.tar")))


# Clips a worker process encodes per task (the frames of 100 default clips: ~19 MB), and the most tasks in flight:
# enough to keep 4 workers busy while the writer keeps the shards' order.
ENCODE_CHUNK = 100
MAX_IN_FLIGHT = 8


def encode_workers() -> int:
    """Processes that share the encoding: the CPUs this process may use, at most 4 (x264 with one thread each)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _encode_chunk(clips: list[list[np.ndarray]], fps: int, crf: int) -> list[bytes]:
    return [encode_mp4(frames, fps, crf) for frames in clips]


def _encoded(rendered: Iterator[tuple[list[np.ndarray], list[dict[str, Any]]]], cfg: Any, pool: Executor | None):
    """(mp4 bytes, objects) of each rendered clip, in order. With a pool, its processes encode chunks of clips
    while this one renders the next: the same bytes (each clip's x264 has one thread and its own state), in a
    fraction of the time (the encoding is ~90% of the writing)."""
    if pool is None:
        for frames, objects in rendered:
            yield encode_mp4(frames, cfg.fps, cfg.crf), objects
        return
    pending: collections.deque = collections.deque()
    while chunk := list(itertools.islice(rendered, ENCODE_CHUNK)):
        frames = [f for f, _ in chunk]
        pending.append((pool.submit(_encode_chunk, frames, cfg.fps, cfg.crf), [o for _, o in chunk]))
        while len(pending) > MAX_IN_FLIGHT:
            future, objects = pending.popleft()
            yield from zip(future.result(), objects)
    for future, objects in pending:
        yield from zip(future.result(), objects)


def _write_split(folder: str, split: str, num_clips: int, cfg: Any, pool: Executor | None = None) -> None:
    # A seed stream per split, so held-out clips never repeat the train ones.
    rng = random.Random(f"vlm_train.synthetic_video/{split}/{cfg.seed}")
    rendered = (render_clip(rng, cfg) for _ in range(num_clips))
    writer = None
    clip = {"width": cfg.width, "height": cfg.height, "frames": cfg.frames, "fps": cfg.fps}
    for index, (mp4, objects) in enumerate(_encoded(rendered, cfg, pool)):
        if index % cfg.clips_per_shard == 0:
            if writer is not None:
                writer.close()
            name = os.path.join(folder, f"{split}-{index // cfg.clips_per_shard:06d}.tar")
            writer = wds.TarWriter(name, encoder=False, mtime=0)  # fixed mtime: byte-identical shards per seed
        # The attributes sit under "objects" and "clip": no top-level number, which would become a sample's meta.
        meta = {"task": "caption", "objects": objects, "clip": clip}
        writer.write(
            {
                "__key__": f"{split}{index:06d}",
                "mp4": mp4,
                "txt": caption_text(objects).encode(),
                "json": dumps(meta).encode(),
            }
        )
    if writer is not None:
        writer.close()


@contextlib.contextmanager
def _encode_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for the encoding (forked where the platform can: they need nothing but this module), or
    None for one worker."""
    if workers <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield pool


def ensure_synthetic_video_shards(cfg: Any) -> SyntheticVideoShards:
    """Write the clips for `cfg` once into the cache and return their shard paths; later calls reuse them."""
    _check_config(cfg)
    final = dataset_dir(cfg)
    if not os.path.exists(os.path.join(final, MARKER)):
        _generate(cfg, final)
    return SyntheticVideoShards(final, _shard_urls(final, "train"), _shard_urls(final, "heldout"))


def _generate(cfg: Any, final: str, workers: int | None = None) -> None:
    """Write into a temporary folder and rename it into place: readers only ever see complete datasets."""
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    log.info(
        "generating synthetic video dataset (%d train + %d held-out clips) in %s",
        cfg.num_train_clips,
        cfg.num_heldout_clips,
        final,
    )
    start = time.perf_counter()
    workers = encode_workers() if workers is None else workers
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        with _encode_pool(workers) as pool:
            _write_split(tmp, "train", cfg.num_train_clips, cfg, pool)
            _write_split(tmp, "heldout", cfg.num_heldout_clips, cfg, pool)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(dumps({"format_version": FORMAT_VERSION, "config": _cache_key(cfg)}, indent=2))
        if os.path.isdir(final) and not os.path.exists(os.path.join(final, MARKER)):
            log.warning("replacing incomplete synthetic video dataset folder %s", final)
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
    log.info("wrote synthetic video dataset in %.1fs (%d encoding processes)", time.perf_counter() - start, workers)
