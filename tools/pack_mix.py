"""A realistic mix of sample sizes for packing studies: captions, multi-image conversations, long text.

Sizes follow Qwen2-VL's geometry (14 px patches, 2x2 merge: one LLM token per 28x28 px, four ViT patches per token)
and its chat template (about 5 tokens of framing per turn, 2 per image). The shares and shapes follow public data:
- captions (50% of samples): CC3M/LAION-style web images (median ~0.2 MP, aspect 1:2 to 2:1), captions of ~15 tokens;
- conversations (35%): LLaVA-Instruct/ShareGPT4V-style, 1-3 larger images (60/25/15%), 1-6 turns, answers of
  ~90 tokens with a long tail;
- text-only (15%): long documents or text SFT, median ~1800 tokens; a few exceed an 8k budget and are dropped;
- videos (0% unless `video` is set; the other shares then scale down): LLaVA-Video-style clips of 10-180 s (median
  30 s) at 640x360, sampled and sized by data/video.py's own rules (2 fps, 4-64 frames, <= VIDEO_TOTAL_PIXELS, a
  6144-token total that fits an 8k pack), a ~20-token question and a ~60-token answer.
Each record: llm_tokens, vit_patches, images, kind, and for FLOPs counting (tools/bench_rank_balance.py) the
supervised tokens (answers and their <|im_end|>; all of a text sample) and each image's patch grid [t, h, w].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vlm_train.data.image import PatchSpec, smart_resize
from vlm_train.jsonio import dumps

# Qwen2-VL processor defaults, but images capped at 1024 tokens, as many fine-tuning recipes do.
MIX_SPEC = PatchSpec(min_pixels=56 * 56, max_pixels=1024 * 28 * 28)
TURN_FRAMING = 5  # <|im_start|>, role, newline, <|im_end|>, newline
IMAGE_FRAMING = 2  # <|vision_start|>, <|vision_end|>


@dataclass(frozen=True)
class MixShares:
    caption: float = 0.50
    conversation: float = 0.35
    text: float = 0.15
    video: float = 0.0


# Video sampling of the mix: qwen-vl-utils' rules with a frame and pixel total that fits an 8k-token pack.
VIDEO_TOTAL_TOKENS = 6144


def _lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def _image(rng: random.Random, median_pixels: float) -> tuple[int, int, list[int]]:
    """(LLM tokens, ViT patches, patch grid [t, h, w]) of one image: lognormal area, log-uniform aspect in [1/2, 2]."""
    area = rng.lognormvariate(math.log(median_pixels), 0.6)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    height, width = (max(1, round(math.sqrt(area / aspect))), max(1, round(math.sqrt(area * aspect))))
    height, width = smart_resize(height, width, MIX_SPEC)
    rows, columns = height // MIX_SPEC.patch_size, width // MIX_SPEC.patch_size
    return rows * columns // MIX_SPEC.merge_size**2, rows * columns, [1, rows, columns]


def _caption(rng: random.Random) -> dict:
    tokens, patches, grid = _image(rng, 500 * 400)
    caption = _lognormal(rng, 15, 0.5, 3, 80)
    tokens += 2 * TURN_FRAMING + IMAGE_FRAMING + caption + 5  # the caption and the prompt
    return {
        "llm_tokens": tokens,
        "vit_patches": patches,
        "images": 1,
        "kind": "caption",
        "supervised": caption + 1,  # the answer and its <|im_end|>
        "grids": [grid],
    }


def _conversation(rng: random.Random) -> dict:
    images = rng.choices([1, 2, 3], [0.60, 0.25, 0.15])[0]
    sizes = [_image(rng, 800 * 600) for _ in range(images)]
    turns = rng.randint(1, 6)
    texts = [(_lognormal(rng, 15, 0.6, 3, 200), _lognormal(rng, 90, 0.8, 5, 1200)) for _ in range(turns)]
    text = sum(question + answer for question, answer in texts)
    tokens = 2 * turns * TURN_FRAMING + images * IMAGE_FRAMING + text + sum(t for t, _, _ in sizes)
    return {
        "llm_tokens": tokens,
        "vit_patches": sum(p for _, p, _ in sizes),
        "images": images,
        "kind": "conversation",
        "supervised": sum(answer + 1 for _, answer in texts),
        "grids": [g for _, _, g in sizes],
    }


def _text(rng: random.Random) -> dict:
    tokens = _lognormal(rng, 1800, 0.7, 256, 32768)
    return {"llm_tokens": tokens, "vit_patches": 0, "images": 0, "kind": "text", "supervised": tokens, "grids": []}


def _video(rng: random.Random) -> dict:
    from vlm_train.data.video import VideoConfig, frame_size, smart_nframes  # PyAV only when videos are asked for

    cfg = VideoConfig(max_frames=64, total_pixels=VIDEO_TOTAL_TOKENS * MIX_SPEC.factor**2)
    seconds = _lognormal(rng, 30, 0.7, 10, 180)
    frames = smart_nframes(seconds * 30, 30.0, cfg)
    height, width = frame_size(360, 640, frames, cfg, MIX_SPEC.factor)
    grid = [frames // 2, height // MIX_SPEC.patch_size, width // MIX_SPEC.patch_size]
    patches = grid[0] * grid[1] * grid[2]
    question, answer = _lognormal(rng, 20, 0.5, 3, 200), _lognormal(rng, 60, 0.8, 3, 800)
    return {
        "llm_tokens": 2 * TURN_FRAMING + IMAGE_FRAMING + question + answer + patches // MIX_SPEC.merge_size**2,
        "vit_patches": patches,
        "images": 1,
        "kind": "video",
        "supervised": answer + 1,
        "grids": [grid],
    }


def make_mix(samples: int, seed: int, shares: MixShares = MixShares()) -> list[dict]:
    """`samples` size records of the realistic mix, the same for the same seed (and the same without videos)."""
    rng = random.Random(seed)
    makers = [_caption, _conversation, _text] + ([_video] if shares.video else [])
    weights = [shares.caption, shares.conversation, shares.text] + ([shares.video] if shares.video else [])
    return [rng.choices(makers, weights)[0](rng) for _ in range(samples)]


def write_mix(path: str, samples: int, seed: int, video_share: float = 0.0) -> None:
    """The mix as a lengths file; `video_share` of the samples are videos, the other kinds keep their proportions."""
    base = MixShares()
    rest = 1.0 - video_share
    shares = MixShares(base.caption * rest, base.conversation * rest, base.text * rest, video_share)
    with open(path, "w") as f:
        f.writelines(dumps(record) + "\n" for record in make_mix(samples, seed, shares))
