"""Training-step benchmark: the same samples as one packed sequence vs a padded batch. Prints JSON.

    python tools/bench_step.py --rows 8 --steps 6                 # tiny model, CPU
    python tools/bench_step.py --model qwen2_5_vl_3b --device cuda --rows 8 --max-words 400

Each step takes `rows` caption samples (a random-size image and a caption of random length) and runs forward,
backward and an AdamW step, either packed (one varlen sequence: vlm_train's training path) or padded (the
samples right-padded to the longest into [rows, L], attention by scaled_dot_product_attention with a
causal + padding mask). Both start from the same weights and see the same samples; the vision tower runs on
the same patches either way. Reported per layout: real tokens/s and step time (the fastest of --repeats
passes over the steps), peak memory, and the first and last losses (equal in both); then the packed/padded
speedup beside padded/real tokens, which bounds it where compute is linear in tokens. `equal_length` repeats
this with samples all of one length (no padding at all): the cost of the varlen bookkeeping itself.

On CPU both layouts live in this process and their timed passes alternate, so a shared machine's load falls
on both alike; the fastest pass of each counts. Peak memory: on CUDA torch.cuda.max_memory_allocated above the
allocation before the first step (layouts run one after the other); on CPU the growth of the peak RSS
(VmHWM) over warm-up and one timed pass, each layout in a fresh process (--no-isolate: measured in this
process, where only the first layout's figure is meaningful).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

from vlm_train.benchmarking import TimedLayout, bench_patch_spec, isolated_peak_memory, run_alone, run_alternating
from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.pack_planner import Budget
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tokenizer import build_tiny_tokenizer, special_ids
from vlm_train.data.truncate import truncate
from vlm_train.devices import pick_device
from vlm_train.jsonio import dumps
from vlm_train.model.llm import DecoderLayer, DecoderLM
from vlm_train.model.vlm import VLM
from vlm_train.train.config import compose_config
from vlm_train.train.loss import token_cross_entropy

MODES = ("packed", "padded")
WORDS = (
    "a red green blue yellow purple orange square triangle ring cross small large left right top bottom of the on "
    "near above below with and image shape"
).split()


@dataclass
class BenchConfig:
    model: str = "tiny"  # a preset of conf/model
    rows: int = 8  # samples per step: the padded batch's rows, one pack when packed
    steps: int = 6  # timed steps (each on its own samples)
    repeats: int = 3  # timed passes over those steps; the fastest counts
    warmup: int = 1  # untimed steps first
    min_side: int = 56  # image sides drawn from [min_side, max_side] pixels
    max_side: int = 168
    min_words: int = 2  # caption length drawn from [min_words, max_words] words
    max_words: int = 120
    equal_tokens: int = 0  # equal-length run: every sample cut to this many tokens (0: the shortest sample's)
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0
    attn_backend: str = "auto"


# ---------------------------------------------------------------- samples


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_samples(cfg: BenchConfig, encoder: Encoder, count: int, equal: bool) -> list[EncodedSample]:
    """`count` encoded caption samples; with `equal` one image size and every sample cut to one length."""
    rng = np.random.default_rng(cfg.seed)
    samples = []
    for i in range(count):
        if equal:
            width = height = (cfg.min_side + cfg.max_side) // 2
            words = cfg.max_words
        else:
            width, height = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
            words = int(rng.integers(cfg.min_words, cfg.max_words + 1))
        caption = " ".join(rng.choice(WORDS, size=words))
        turns = [Turn("user", IMAGE_PLACEHOLDER + "Describe the image."), Turn("assistant", caption)]
        samples.append(encoder.encode(Sample(f"s{i}", "bench", "caption", [_image(rng, width, height)], turns, {})))
    if equal:
        length = cfg.equal_tokens or min(s.num_tokens for s in samples)
        cut = [truncate(s, Budget(length, 1 << 30), encoder.special) for s in samples]
        if any(c is None or c.num_tokens != length for c in cut):
            raise ValueError(
                f"cannot cut every sample to {length} tokens without cutting an image: raise "
                "--equal-tokens or --max-words"
            )
        samples = cut
    return samples


# ---------------------------------------------------------------- the two layouts


@dataclass
class PaddedBatch:
    """The samples of a pack right-padded into rows: [B, L] ids/labels, [3, B, L] positions, lengths [B]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @classmethod
    def from_samples(cls, samples: list[EncodedSample], pad_id: int) -> PaddedBatch:
        longest = max(s.num_tokens for s in samples)
        ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((3, len(samples), longest), dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, : s.num_tokens] = torch.from_numpy(s.input_ids)
            labels[row, : s.num_tokens] = torch.from_numpy(s.labels)
            positions[:, row, : s.num_tokens] = torch.from_numpy(s.position_ids)
        pack = collate(samples)  # the image patches, laid out as the packed batch has them
        return cls(
            ids,
            labels,
            positions,
            torch.tensor([s.num_tokens for s in samples]),
            pack.pixel_values,
            pack.image_grid_thw,
        )

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def _padded_layer(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(x), cos, sin)  # [B, L, H, hd]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=attn.num_heads != attn.num_kv_heads,
    )
    x = x + attn.o_proj(out.transpose(1, 2).flatten(2))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def padded_llm_forward(
    llm: DecoderLM, embeds: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The decoder on a right-padded batch: embeds [B, L, D], position_ids [3, B, L] -> hidden [B, L, D].

    Uses the model's own layers; attention is one batched SDPA call with a causal and key-padding mask.
    """
    batch, length, _ = embeds.shape
    cos, sin = llm.rotary(position_ids.reshape(3, -1), embeds.device)
    cos, sin = cos.view(batch, length, -1), sin.view(batch, length, -1)
    causal = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril()
    valid = torch.arange(length, device=embeds.device) < lengths.to(embeds.device).unsqueeze(1)  # [B, L]
    mask = (causal & valid[:, None, :]).unsqueeze(1)  # [B, 1, L, L]; padded queries see the real keys before them
    x = embeds
    for layer in llm.layers:
        if llm.activation_checkpointing and llm.training:
            x = checkpoint(_padded_layer, layer, x, cos, sin, mask, use_reentrant=False)
        else:
            x = _padded_layer(layer, x, cos, sin, mask)
    return llm.norm(x)


def padded_forward(model: VLM, batch: PaddedBatch) -> torch.Tensor:
    """Hidden states [B*L, D] of the padded batch: ViT on the images, their embeddings scattered into the rows."""
    embeds = model.llm.embed(batch.input_ids)
    is_image = batch.input_ids == model.image_token_id
    image_embeds = model.encode_images(batch.pixel_values, batch.image_grid_thw)
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
    return padded_llm_forward(model.llm, embeds, batch.position_ids, batch.lengths).flatten(0, 1)


# ---------------------------------------------------------------- one mode


def build_model(cfg: BenchConfig, vocab_size: int, image_token_id: int) -> VLM:
    model_cfg = compose_config(f"model={cfg.model}").model
    model_cfg.attn_backend = cfg.attn_backend
    for field in ("init_from_hf", "init_llm_from_hf", "init_vision_from_hf"):
        setattr(model_cfg, field, "")  # random weights: the benchmark measures speed, not quality
    torch.manual_seed(cfg.seed)
    return VLM(model_cfg, vocab_size=max(model_cfg.llm.vocab_size, vocab_size), image_token_id=image_token_id)


class Layout(TimedLayout):
    """One layout (packed or padded) of the benchmark samples: its own model copy, optimizer and batches."""

    def __init__(self, cfg: BenchConfig, mode: str, equal: bool) -> None:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.mode = cfg, mode
        self.device = pick_device(cfg.device)
        tokenizer = build_tiny_tokenizer(corpus_lines())
        self.model = build_model(cfg, len(tokenizer), special_ids(tokenizer).image_pad).to(self.device).train()
        vision = self.model.cfg.vision  # the samples take the model's patch geometry, whatever the preset
        spec = bench_patch_spec(vision, cfg.min_side, cfg.max_side)
        encoder = Encoder(tokenizer, spec)
        samples = make_samples(cfg, encoder, cfg.rows * (cfg.warmup + cfg.steps), equal)
        self.groups = [samples[i : i + cfg.rows] for i in range(0, len(samples), cfg.rows)]
        if mode == "packed":
            self.batches: list[PackedBatch | PaddedBatch] = [collate(g) for g in self.groups]
        else:
            self.batches = [PaddedBatch.from_samples(g, encoder.special.pad) for g in self.groups]
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        super().__init__(self.device, cfg.warmup, len(self.batches))

    def step(self, index: int) -> torch.Tensor:
        """Forward, backward and optimizer step on batch `index`; the loss is the mean over supervised tokens."""
        model, batch = self.model, self.batches[index].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.mode == "packed":
                hidden, labels = model(batch, return_logits=False).hidden, batch.labels
            else:
                hidden, labels = padded_forward(model, batch), batch.labels.flatten()
            token_losses = token_cross_entropy(hidden, labels, head=model.llm.lm_head)
        loss = token_losses.sum() / (labels != IGNORE_INDEX).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def figures(self, peak_memory_mb: float) -> dict[str, Any]:
        timed = self.groups[self.cfg.warmup :]
        real = sum(s.num_tokens for g in timed for s in g)
        seconds = self.fastest_pass
        return {
            "mode": self.mode,
            "tokens_per_s": real / seconds,
            "step_time_s": seconds / self.cfg.steps,
            "pass_times_s": self.passes,
            "peak_memory_mb": peak_memory_mb,
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
            "real_tokens": real,
            "padded_tokens": sum(len(g) * max(s.num_tokens for s in g) for g in timed),
            "parameters": self.model.num_parameters(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }


def run_mode(cfg: BenchConfig, mode: str, equal: bool) -> dict[str, Any]:
    """One layout alone: warm-up, then --repeats timed passes; peak memory over all its steps."""
    return run_alone(Layout(cfg, mode, equal), cfg.repeats)


def _run_alternating(cfg: BenchConfig, equal: bool, isolate: bool) -> dict[str, dict[str, Any]]:
    """CPU: both layouts in this process, their timed passes alternating so both see the same machine load."""
    make = {mode: functools.partial(Layout, cfg, mode, equal) for mode in MODES}
    isolated = (lambda mode: isolated_peak_memory(run_mode, cfg, mode, equal)) if isolate else None
    return run_alternating(make, cfg.repeats, isolated)


def compare(cfg: BenchConfig, equal: bool, isolate: bool) -> dict[str, Any]:
    """Both layouts on the same samples, and their ratios."""
    if pick_device(cfg.device).type == "cuda":  # stable timings, and two large models may not fit at once
        results = {mode: run_mode(cfg, mode, equal) for mode in MODES}
    else:
        results = _run_alternating(cfg, equal, isolate)
    packed, padded = results["packed"], results["padded"]
    keep = ("tokens_per_s", "step_time_s", "pass_times_s", "peak_memory_mb", "first_loss", "last_loss")
    return {
        "real_tokens": packed["real_tokens"],
        "padded_tokens": packed["padded_tokens"],
        "padded_over_real": packed["padded_tokens"] / packed["real_tokens"],
        "packed": {k: packed[k] for k in keep},
        "padded": {k: padded[k] for k in keep},
        "speedup": packed["tokens_per_s"] / padded["tokens_per_s"],
        "memory_ratio": packed["peak_memory_mb"] / padded["peak_memory_mb"] if padded["peak_memory_mb"] else None,
        "first_loss_abs_diff": abs(packed["first_loss"] - padded["first_loss"]),
        "parameters": packed["parameters"],
        "device": packed["device"],
        "threads": packed["threads"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="CPU peak memory measured in this process, not "
        "in a fresh one per layout (then meaningful only for the first)",
    )
    parser.add_argument("--skip-equal", action="store_true", help="skip the equal-length (varlen overhead) run")
    args = parser.parse_args(argv)
    isolate = not args.no_isolate
    cfg = BenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if cfg.rows <= 0 or cfg.steps <= 0 or cfg.repeats <= 0 or cfg.warmup < 0:
        parser.error("--rows, --steps and --repeats must be positive, --warmup >= 0")
    if not 0 < cfg.min_side <= cfg.max_side or not 0 < cfg.min_words <= cfg.max_words:
        parser.error("need 0 < --min-side <= --max-side and 0 < --min-words <= --max-words")
    try:
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device: {error}")
    isolate = isolate and device.type == "cpu"  # CUDA peaks reset per mode; RSS peaks cannot
    if device.type == "cuda":
        memory_method = "torch.cuda.max_memory_allocated - allocated before the steps"
    else:
        where = "each layout in a fresh process" if isolate else "both layouts in one process"
        memory_method = f"peak RSS (VmHWM) growth over warm-up and one timed pass, {where}"
    load_before = list(os.getloadavg())
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "memory_method": memory_method,
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "variable": compare(cfg, equal=False, isolate=isolate),
    }
    if not args.skip_equal:
        equal = compare(cfg, equal=True, isolate=isolate)
        equal["overhead"] = equal["packed"]["step_time_s"] / equal["padded"]["step_time_s"] - 1
        result["equal_length"] = equal
    result["load_avg_after"] = list(os.getloadavg())
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
