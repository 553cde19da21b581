"""Vision-stage benchmark: the vision tower + pooling head on the same images as one packed sequence vs a padded
batch. Prints JSON.

    python tools/bench_vision_stage.py                                  # tiny tower, MAP head, CPU
    python tools/bench_vision_stage.py --pooling mean --images 16 --steps 2
    python tools/bench_vision_stage.py --device cuda --images 64 --max-side 448

Each step takes --images images of random sizes (sides drawn from [--min-side, --max-side] pixels, patchified by
the encoder as in training; each image is a caption sample, encoded and collated as the loader would) and runs
forward, backward and an AdamW step of the vision tower, the vision stage's pooling head (--pooling: map, a
learned query per image, or mean), its norm and the image projection, under SigLIP's sigmoid loss (with the
learned temperature and bias). To keep the comparison about the tower, the text side is not a text tower: each
image's partner is a fixed random target embedding, drawn from --seed, the same in both layouts. Either

- packed: every image's patches in one varlen sequence, `vision(pixel_values, grid_thw)` then
  `heads.pool_images(features, lengths)`: exactly the training path of a `kind: vision` stage; or
- padded: the images' patches right-padded to the longest image into [images, L, D] and run through the same
  VisionBlock weights with a padded attention (qkv, the same 2D rotary laid out per row, one batched
  scaled_dot_product_attention with a key-padding mask, bidirectional; proj; the block's MLP), then the same
  head pooled over each row's real patches only (MAP: the softmax runs over the real patches).

Both start from the same weights (--seed) and see the same images and targets, so the first step's loss is the
same in both (float32 on CPU: to ~1e-6); `first_loss` and `last_loss` are reported per layout. Only towers
without window attention (vision.window_size 0, as the tiny preset) are supported: a padded row is one whole
image. Reported per layout: images/s and real patches/s and the step time, from the fastest of --repeats passes
over the --steps timed steps (after --warmup untimed ones), and the peak memory; then the packed/padded speedup
beside `padded_over_real_patches` (padded / real patches), which bounds it where compute is linear in patches
(attention grows faster, so the padded layout can lose more than that).

On CPU both layouts live in this process and their timed passes alternate, so a shared machine's load falls on
both alike; the fastest pass of each counts. Peak memory: on CUDA torch.cuda.max_memory_allocated above the
allocation before the first step (layouts run one after the other); on CPU the growth of the peak RSS (VmHWM)
over warm-up and one timed pass, each layout in a fresh process (--no-isolate: measured in this process, where
only the first layout's figure is meaningful).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_train.benchmarking import TimedLayout, bench_patch_spec, isolated_peak_memory, run_alone, run_alternating
from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tokenizer import build_tiny_tokenizer
from vlm_train.devices import pick_device
from vlm_train.jsonio import dumps
from vlm_train.model.attention import resolve_backend
from vlm_train.model.config import ModelConfig, VisionConfig
from vlm_train.model.rope import apply_rotary, inv_frequencies, vision_cos_sin_at, vision_positions
from vlm_train.model.vision_heads import POOLINGS, VisionHeads, VisionHeadsConfig, attach_heads
from vlm_train.model.vit import VisionBlock, VisionTransformer
from vlm_train.model.vlm import init_weights
from vlm_train.train.config import compose_config
from vlm_train.train.vision_objective import sigmoid_contrastive_loss

# The figures reported per layout.
FIGURES = ("images_per_s", "patches_per_s", "step_time_s", "pass_times_s", "peak_memory_mb", "first_loss", "last_loss")
MODES = ("packed", "padded")
WORDS = (
    "a red green blue yellow purple orange square triangle ring cross small large left right top bottom of the on "
    "near above below with and image shape"
).split()
UNTRAINED = ("vision_heads.text_proj.", "vision_heads.label_head.")  # the heads' text side and labels: unused here


@dataclass
class BenchConfig:
    model: str = "tiny"  # a preset of conf/model (its vision tower must not use window attention)
    images: int = 32  # images per step: the padded batch's rows, one pack when packed
    steps: int = 4  # timed steps (each on its own images)
    repeats: int = 3  # timed passes over those steps; the fastest counts
    warmup: int = 1  # untimed steps first
    min_side: int = 56  # image sides drawn from [min_side, max_side] pixels
    max_side: int = 336
    pooling: str = "map"  # the vision stage's pooling head: map | mean
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0
    attn_backend: str = "auto"


# ---------------------------------------------------------------- images


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_samples(cfg: BenchConfig, encoder: Encoder, count: int) -> list[EncodedSample]:
    """`count` encoded caption samples of one random-size image each (a caption of a few words)."""
    rng = np.random.default_rng(cfg.seed)
    samples = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))
        turns = [Turn("user", IMAGE_PLACEHOLDER + "Describe the image."), Turn("assistant", caption)]
        sample = Sample(f"s{i}", "bench", "caption", [_image(rng, width, height)], turns, {"answer": caption})
        samples.append(encoder.encode(sample))
    return samples


def make_targets(cfg: BenchConfig, embed_dim: int, count: int) -> list[torch.Tensor]:
    """The text side: one fixed random embedding per image, [images, embed_dim] per step, from --seed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return [torch.randn(cfg.images, embed_dim, generator=generator) for _ in range(count)]


@dataclass
class PaddedImages:
    """The images of a pack right-padded into rows: uint8 pixels [B*L, C*p*p], (row, column) [B, L, 2], lengths [B]."""

    pixel_values: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_pack(cls, pack: PackedBatch, merge: int) -> PaddedImages:
        if (pack.image_grid_thw[:, 0] != 1).any():
            raise ValueError("the padded layout takes still images (t = 1), one row per image")
        lengths = torch.diff(pack.vit_cu_seqlens.long())
        bounds = pack.vit_cu_seqlens.tolist()
        rows, longest = len(lengths), int(lengths.max())
        pixels = pack.pixel_values.new_zeros(rows, longest, pack.pixel_values.shape[1])
        positions = torch.zeros(rows, longest, 2, dtype=torch.long)
        patch_positions = vision_positions(pack.image_grid_thw, merge)  # what the tower's layout gives, merge order
        for row, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            pixels[row, : end - start] = pack.pixel_values[start:end]
            positions[row, : end - start] = patch_positions[start:end]
        return cls(pixels.flatten(0, 1), positions, lengths)

    def to(self, device: torch.device) -> PaddedImages:
        return PaddedImages(**{k: v.to(device) for k, v in self.__dict__.items()})


# ---------------------------------------------------------------- the padded layout


def check_full_attention(vision: VisionConfig) -> None:
    """Raise unless every block of the tower attends over whole images (a padded row is one whole image)."""
    if any(vision.uses_window(index) for index in range(vision.depth)):
        raise ValueError(
            f"the padded layout supports only vision towers without window attention, but this one has "
            f"vision.window_size {vision.window_size} (full-attention blocks {vision.fullatt_block_indexes}); "
            "pick a preset whose vision.window_size is 0, such as tiny"
        )


def _padded_block(
    block: VisionBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """VisionBlock.forward on rows [B, L, D]: its own weights, attention by one SDPA call with a key-padding mask."""
    attn = block.attn
    batch, length, _ = x.shape
    q, k, v = attn.qkv(block.norm1(x)).view(batch, length, 3, attn.num_heads, attn.head_dim).unbind(2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos/sin [B, L, hd] broadcast over heads
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    x = x + attn.proj(out.transpose(1, 2).flatten(2))
    return x + block.mlp(block.norm2(x))


def padded_tower(tower: VisionTransformer, images: PaddedImages) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower on padded rows: features [B, L, D] and the mask of real patches [B, L]."""
    check_full_attention(tower.cfg)
    batch, length = images.positions.shape[:2]
    x = tower.patch_embed(images.pixel_values).view(batch, length, -1)
    inv_freq = inv_frequencies(tower.cfg.head_dim // 2, tower.cfg.rope_theta, x.device)
    cos, sin = vision_cos_sin_at(images.positions.flatten(0, 1), inv_freq)
    cos, sin = cos.view(batch, length, -1), sin.view(batch, length, -1)
    valid = torch.arange(length, device=x.device) < images.lengths.unsqueeze(1)  # [B, L]
    mask = valid[:, None, None, :]  # [B, 1, 1, L]: every query sees its row's real patches, none of the padding
    for block in tower.blocks:
        if tower.activation_checkpointing and tower.training:
            x = checkpoint(_padded_block, block, x, cos, sin, mask, use_reentrant=False)
        else:
            x = _padded_block(block, x, cos, sin, mask)
    return x, valid


def padded_pool(heads: VisionHeads, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """heads.pool_images on padded rows: per-image features [B, D] over the real patches of each row."""
    x = heads.norm(features)
    if heads.pool is None:  # mean
        x = x * valid.unsqueeze(-1).to(x.dtype)
        return x.sum(1) / valid.sum(1, keepdim=True).to(x.dtype)
    pool = heads.pool
    batch, length, _ = x.shape
    k, v = pool.kv(x).view(batch, length, 2, pool.heads, pool.head_dim).unbind(2)  # [B, L, H, d]
    q = pool.q(pool.probe).view(pool.heads, pool.head_dim)
    scores = (k * q).sum(-1).float() / math.sqrt(pool.head_dim)  # [B, L, H]
    scores = scores.masked_fill(~valid.unsqueeze(-1), -torch.inf)
    weights = torch.softmax(scores, dim=1).to(v.dtype)  # over each row's real patches
    pooled = pool.out((weights.unsqueeze(-1) * v).sum(1).flatten(1))
    return pooled + pool.mlp(pool.norm(pooled))


# ---------------------------------------------------------------- one layout


class TowerWithHeads(nn.Module):
    """The vision tower and the vision stage's heads, named as on the VLM in training (`vision`, `vision_heads`)."""

    def __init__(self, vision: VisionTransformer, heads: VisionHeads) -> None:
        super().__init__()
        self.vision = vision
        attach_heads(self, heads)

    @property
    def heads(self) -> VisionHeads:
        return self.vision_heads


def model_config(cfg: BenchConfig) -> ModelConfig:
    """The preset's model config (as bench_step loads it), with --attn-backend."""
    model_cfg = compose_config(f"model={cfg.model}").model
    model_cfg.attn_backend = cfg.attn_backend
    return model_cfg


def build_model(cfg: BenchConfig, model_cfg: ModelConfig) -> TowerWithHeads:
    """A random tower (initialised as the VLM initialises it) and heads as the trainer builds them (builders.py);
    the same weights for every call with the same --seed."""
    vision = model_cfg.vision
    check_full_attention(vision)
    torch.manual_seed(cfg.seed)
    tower = VisionTransformer(vision, model_cfg.attn_backend, model_cfg.activation_checkpointing)
    tower.apply(functools.partial(init_weights, std=vision.initializer_range))
    heads_cfg = VisionHeadsConfig(pooling=cfg.pooling, text_tower="llm")  # "llm": no text tower of the heads' own
    heads = VisionHeads(
        heads_cfg,
        vision.hidden_size,
        model_cfg.llm.hidden_size,
        1,  # no vocabulary: the text side is fixed targets
        0,
        model_cfg.attn_backend,
        vision.rms_norm_eps,
        vision.initializer_range,
    )
    return TowerWithHeads(tower, heads)


class Layout(TimedLayout):
    """One layout (packed or padded) of the benchmark images: its own model copy, optimizer and batches."""

    def __init__(self, cfg: BenchConfig, mode: str) -> None:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.mode = cfg, mode
        self.device = pick_device(cfg.device)
        model_cfg = model_config(cfg)
        self.model = build_model(cfg, model_cfg).to(self.device).train()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.attn_backend = resolve_backend(model_cfg.attn_backend, self.device, dtype)
        vision = model_cfg.vision  # the images take the tower's patch geometry, whatever the preset
        spec = bench_patch_spec(vision, cfg.min_side, cfg.max_side)
        encoder = Encoder(build_tiny_tokenizer(corpus_lines()), spec)
        steps = cfg.warmup + cfg.steps
        samples = make_samples(cfg, encoder, cfg.images * steps)
        packs = [collate(samples[i : i + cfg.images]) for i in range(0, len(samples), cfg.images)]
        self.lengths = [torch.diff(p.vit_cu_seqlens.long()) for p in packs]  # patches per image, per step
        if mode == "packed":
            self.batches: list[PackedBatch | PaddedImages] = list(packs)
        else:
            self.batches = [PaddedImages.from_pack(p, vision.spatial_merge_size) for p in packs]
        self.targets = make_targets(cfg, self.model.heads.cfg.embed_dim, steps)
        trained = [p for n, p in self.model.named_parameters() if not n.startswith(UNTRAINED)]
        self.optimizer = torch.optim.AdamW(trained, lr=1e-4)
        self.parameters = sum(p.numel() for p in trained)
        super().__init__(self.device, cfg.warmup, len(self.batches))

    def step(self, index: int) -> torch.Tensor:
        """Forward, backward and optimizer step on step `index`'s images; the loss is SigLIP's over its images."""
        model, heads = self.model, self.model.heads
        batch, targets = self.batches[index].to(self.device), self.targets[index].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.mode == "packed":
                features = model.vision(batch.pixel_values, batch.image_grid_thw)
                pooled = heads.pool_images(features, torch.diff(batch.vit_cu_seqlens.long()))
            else:
                pooled = padded_pool(heads, *padded_tower(model.vision, batch))
            image_embeds = heads.image_proj(pooled)
            loss = sigmoid_contrastive_loss(image_embeds, targets, heads.logit_scale, heads.logit_bias)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def figures(self, peak_memory_mb: float) -> dict[str, Any]:
        timed = self.lengths[self.cfg.warmup :]
        real = sum(int(lengths.sum()) for lengths in timed)
        seconds = self.fastest_pass
        return {
            "mode": self.mode,
            "images_per_s": self.cfg.images * self.cfg.steps / seconds,
            "patches_per_s": real / seconds,
            "step_time_s": seconds / self.cfg.steps,
            "pass_times_s": self.passes,
            "peak_memory_mb": peak_memory_mb,
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
            "real_patches": real,
            "padded_patches": sum(len(lengths) * int(lengths.max()) for lengths in timed),
            "parameters": self.parameters,
            "attn_backend": self.attn_backend,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }


def run_mode(cfg: BenchConfig, mode: str) -> dict[str, Any]:
    """One layout alone: warm-up, then --repeats timed passes; peak memory over all its steps."""
    return run_alone(Layout(cfg, mode), cfg.repeats)


def _run_alternating(cfg: BenchConfig, isolate: bool) -> dict[str, dict[str, Any]]:
    """CPU: both layouts in this process, their timed passes alternating so both see the same machine load."""
    make = {mode: functools.partial(Layout, cfg, mode) for mode in MODES}
    isolated = functools.partial(isolated_peak_memory, run_mode, cfg) if isolate else None
    return run_alternating(make, cfg.repeats, isolated)


def compare(cfg: BenchConfig, isolate: bool) -> dict[str, Any]:
    """Both layouts on the same images, and their ratios."""
    if pick_device(cfg.device).type == "cuda":  # stable timings, and peaks reset per layout
        results = {mode: run_mode(cfg, mode) for mode in MODES}
    else:
        results = _run_alternating(cfg, isolate)
    packed, padded = results["packed"], results["padded"]
    return {
        "images": cfg.images * cfg.steps,
        "real_patches": packed["real_patches"],
        "padded_patches": packed["padded_patches"],
        "padded_over_real_patches": packed["padded_patches"] / packed["real_patches"],
        "packed": {k: packed[k] for k in FIGURES},
        "padded": {k: padded[k] for k in FIGURES},
        "speedup": packed["patches_per_s"] / padded["patches_per_s"],
        "memory_ratio": packed["peak_memory_mb"] / padded["peak_memory_mb"] if padded["peak_memory_mb"] else None,
        "first_loss_rel_diff": abs(packed["first_loss"] - padded["first_loss"]) / abs(padded["first_loss"]),
        "parameters": packed["parameters"],
        "attn_backend": {"packed": packed["attn_backend"], "padded": "sdpa (key-padding mask)"},
        "device": packed["device"],
        "threads": packed["threads"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    for name, value in asdict(defaults).items():
        choices = POOLINGS if name == "pooling" else ("auto", "cpu", "cuda") if name == "device" else None
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, choices=choices)
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="CPU peak memory measured in this process, not in a fresh one per layout (then meaningful only for "
        "the first)",
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if cfg.images <= 0 or cfg.steps <= 0 or cfg.repeats <= 0 or cfg.warmup < 0:
        parser.error("--images, --steps and --repeats must be positive, --warmup >= 0")
    if not 0 < cfg.min_side <= cfg.max_side:
        parser.error("need 0 < --min-side <= --max-side")
    try:
        check_full_attention(model_config(cfg).vision)
    except ValueError as error:
        parser.error(f"--model {cfg.model}: {error}")
    try:
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device: {error}")
    isolate = not args.no_isolate and device.type == "cpu"  # CUDA peaks reset per layout; RSS peaks cannot
    if device.type == "cuda":
        memory_method = "torch.cuda.max_memory_allocated - allocated before the steps"
    else:
        where = "each layout in a fresh process" if isolate else "both layouts in one process"
        memory_method = f"peak RSS (VmHWM) growth over warm-up and one timed pass, {where}"
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "memory_method": memory_method,
        "text_side": "fixed random target embeddings, one per image, the same in both layouts",
        "cpu_count": os.cpu_count(),
        "load_avg_before": list(os.getloadavg()),
    }
    result.update(compare(cfg, isolate))
    result["load_avg_after"] = list(os.getloadavg())
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
