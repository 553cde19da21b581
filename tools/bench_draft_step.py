"""Draft-stage benchmark: one Eagle3 draft training step on the same samples as one pack vs a padded batch. Prints
JSON.

    python tools/bench_draft_step.py                                  # tiny target, CPU
    python tools/bench_draft_step.py --rows 16 --steps 4 --ttt-steps 7
    python tools/bench_draft_step.py --device cuda --rows 32 --max-words 400

Each step takes --rows caption samples (a random-size image and a caption of random length). The frozen target
(a random VLM of the --model preset) runs once over them before any timing (`target_features`, as the draft
stage reads them: its three layers in bf16, its logits over the draft vocabulary), so only the draft is timed:
forward over --ttt-steps training-time-test steps, the soft cross-entropy of each step against the target, the
backward and an AdamW step of the draft. Either

- packed: the samples as one pack, `Eagle3Draft.ttt` with cu_seqlens and `draft_losses` (the draft stage's
  training path: attention within each sample, logits only at supervised positions); or
- padded: the samples right-padded to the longest into [rows, L], as SpecForge and AngelSlim train: every TTT
  step runs the same draft layer on the whole batch, with one batched dense attention under a causal and
  key-padding mask (plus each step's own keys at the query's position), and the logits and loss over all
  [rows, L] positions, masked.

Both start from the same draft weights and see the same target features. Before any timing, every sample's loss
of every TTT step is computed both ways in float32 and must agree (`loss_check`: the largest difference,
relative to the largest loss; the tool stops if it exceeds the tolerance). Reported per layout: real tokens/s and
the step time (the fastest of --repeats passes over the --steps timed steps, after --warmup untimed ones), the
peak memory, and the first and last losses (equal in both); then the packed/padded speedup beside the real-token
fraction of the padded batch.

On CPU both layouts live in this process and their timed passes alternate, so a shared machine's load falls on
both alike; the fastest pass of each counts. Peak memory: on CUDA torch.cuda.max_memory_allocated above the
allocation before the first step (layouts run one after the other); on CPU the growth of the peak RSS (VmHWM)
over warm-up and one timed pass, each layout in a fresh process (--no-isolate: measured in this process, where
only the first layout's figure is meaningful).
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
from PIL import Image

from vlm_train.benchmarking import TimedLayout, bench_patch_spec, isolated_peak_memory, run_alone, run_alternating
from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tokenizer import build_tiny_tokenizer, special_ids
from vlm_train.devices import pick_device
from vlm_train.jsonio import dumps
from vlm_train.model.config import LLMConfig
from vlm_train.model.draft import DraftInputs, DraftShapeConfig, Eagle3Draft, draft_losses
from vlm_train.model.llm import rotary_cos_sin
from vlm_train.model.vlm import VLM
from vlm_train.train.config import compose_config
from vlm_train.train.draft_objective import choose_vocabulary, step_masks, target_distribution, target_features

MODES = ("packed", "padded")
FIGURES = ("tokens_per_s", "step_time_ms", "pass_times_s", "peak_memory_mb", "first_loss", "last_loss")
LOSS_TOLERANCE = 1e-4  # per-sample losses, packed vs padded in float32, relative to the largest
WORDS = (
    "a red green blue yellow purple orange square triangle ring cross small large left right top bottom of the on "
    "near above below with and image shape"
).split()


@dataclass
class BenchConfig:
    model: str = "tiny"  # a preset of conf/model: the target
    rows: int = 8  # samples per step: the padded batch's rows, one pack when packed
    steps: int = 6  # timed steps (each on its own samples)
    repeats: int = 3  # timed passes over those steps; the fastest counts
    warmup: int = 1  # untimed steps first
    min_side: int = 56  # image sides drawn from [min_side, max_side] pixels
    max_side: int = 168
    min_words: int = 2  # caption length drawn from [min_words, max_words] words
    max_words: int = 120
    ttt_steps: int = 7  # training-time-test steps (eagle3.ttt_steps)
    step_weight: float = 0.8  # step j's loss weighs step_weight ** j (eagle3.step_weight)
    draft_vocab_size: int = 256  # capped at the target's vocabulary (the tiny tokenizer has 348 ids)
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0


# ---------------------------------------------------------------- samples and the target's features


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_samples(cfg: BenchConfig, encoder: Encoder, count: int) -> list[EncodedSample]:
    """`count` encoded caption samples of a random-size image and a caption of random length."""
    rng = np.random.default_rng(cfg.seed)
    samples = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(cfg.min_words, cfg.max_words + 1))))
        turns = [Turn("user", IMAGE_PLACEHOLDER + "Describe the image."), Turn("assistant", caption)]
        samples.append(encoder.encode(Sample(f"s{i}", "bench", "caption", [_image(rng, width, height)], turns, {})))
    return samples


@dataclass
class PackedDraftBatch:
    """One pack as the draft stage reads it: ids [T], positions [3, T], cu_seqlens, and the target's inputs."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    sample_index: torch.Tensor  # [T]: the sample of each token
    inputs: DraftInputs


@dataclass
class PaddedDraftBatch:
    """The same samples right-padded into rows: ids [B, L], positions [3, B, L], lengths [B], the target's three
    layers [B, L, 3D] and logits over the draft vocabulary [B, L, N], and the supervised positions [K, B, L]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    aux: torch.Tensor
    target_logits: torch.Tensor
    masks: torch.Tensor

    @classmethod
    def from_packed(cls, batch: PackedDraftBatch) -> PaddedDraftBatch:
        bounds = batch.cu_seqlens.tolist()
        lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=batch.input_ids.device)
        rows, longest = len(lengths), int(lengths.max())

        def pad(values: torch.Tensor, dim: int) -> torch.Tensor:
            """values [..., T, ...] (tokens along `dim`) -> [..., B, L, ...], zeros past each row's end."""
            shape = list(values.shape)
            shape[dim : dim + 1] = [rows, longest]
            out = values.new_zeros(shape)
            for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                out.select(dim, row).narrow(dim, 0, b - a).copy_(values.narrow(dim, a, b - a))
            return out

        inputs = batch.inputs
        return cls(
            pad(batch.input_ids, 0),
            pad(batch.position_ids, 1),
            lengths,
            pad(inputs.aux, 0),
            pad(inputs.target_logits, 0),
            pad(inputs.masks, 1),
        )


@dataclass
class BenchData:
    """What both layouts start from: the draft's initial weights, and per step its packed and padded batches."""

    target: LLMConfig  # the target's decoder, which shapes the draft
    vocab_size: int  # the target's vocabulary
    draft_state: dict[str, torch.Tensor]
    packed: list[PackedDraftBatch]
    padded: list[PaddedDraftBatch]
    lengths: list[list[int]]  # tokens of each sample, per step


def build_target(cfg: BenchConfig, vocab_size: int, image_token_id: int) -> VLM:
    """A random VLM of the preset: the benchmark measures the draft's speed, not what the target knows."""
    model_cfg = compose_config(f"model={cfg.model}").model
    for name in ("init_from_hf", "init_llm_from_hf", "init_vision_from_hf", "init_vision_from"):
        setattr(model_cfg, name, "")
    torch.manual_seed(cfg.seed)
    return VLM(model_cfg, vocab_size=max(model_cfg.llm.vocab_size, vocab_size), image_token_id=image_token_id)


def new_draft(target: LLMConfig, vocab_size: int, cfg: BenchConfig) -> Eagle3Draft:
    """A fresh draft of the target (its default three layers, its width and rotary), as add_draft builds one."""
    return Eagle3Draft(target, DraftShapeConfig(draft_vocab_size=cfg.draft_vocab_size), vocab_size)


def prepare(cfg: BenchConfig, device: torch.device) -> BenchData:
    """The samples, a draft as the draft stage starts it (the target's embedding, the most frequent supervised
    tokens as its vocabulary) and the target's features of every step, all from --seed."""
    tokenizer = build_tiny_tokenizer(corpus_lines())
    target = build_target(cfg, len(tokenizer), special_ids(tokenizer).image_pad).to(device)
    encoder = Encoder(tokenizer, bench_patch_spec(target.cfg.vision, cfg.min_side, cfg.max_side))
    samples = make_samples(cfg, encoder, cfg.rows * (cfg.warmup + cfg.steps))
    groups = [samples[i : i + cfg.rows] for i in range(0, len(samples), cfg.rows)]
    packs = [collate(group) for group in groups]
    vocab_size = target.llm.embed_tokens.weight.shape[0]
    torch.manual_seed(cfg.seed)
    draft = new_draft(target.cfg.llm, vocab_size, cfg).to(device)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.llm.embed_tokens.weight)
    draft.set_vocabulary(choose_vocabulary([p.labels for p in packs], draft.draft_vocab_size, draft.t2d.numel()))
    packed = [_draft_batch(target, draft, pack.to(device), cfg.ttt_steps) for pack in packs]
    return BenchData(
        target.cfg.llm,
        vocab_size,
        {k: v.detach().clone() for k, v in draft.state_dict().items()},
        packed,
        [PaddedDraftBatch.from_packed(batch) for batch in packed],
        [[s.num_tokens for s in group] for group in groups],
    )


def _draft_batch(target: VLM, draft: Eagle3Draft, pack: PackedBatch, steps: int) -> PackedDraftBatch:
    features = target_features(target, pack, draft.target_layers, "bfloat16")
    logits, in_vocab = target_distribution(features.final, target.llm.lm_head.weight, draft)
    inputs = DraftInputs(features.aux, logits, step_masks(pack, in_vocab, steps))
    return PackedDraftBatch(pack.input_ids, pack.position_ids, pack.cu_seqlens, pack.sample_index, inputs)


# ---------------------------------------------------------------- the padded reference


def padded_ttt_attention(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """ttt_attention on rows: q [B, L, Hq, hd]; step 0's keys under `mask` [B, L, L] (causal and key padding),
    steps 1..j's keys at the query's own position only. Returns [B, L, Hq, hd]."""
    rep = q.shape[2] // keys[0].shape[2]
    scale = q.shape[-1] ** -0.5
    length = q.shape[1]

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, Hkv, hd] -> [B, Hq, L, hd], float32
        return x.repeat_interleave(rep, 2).transpose(1, 2).float()

    qs = q.transpose(1, 2).float()
    scores = (qs @ heads(keys[0]).transpose(-1, -2)) * scale  # [B, H, L, L]
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    diagonal = [(qs * heads(k)).sum(-1, keepdim=True) * scale for k in keys[1:]]  # [B, H, L, 1] each
    probs = torch.softmax(torch.cat([scores, *diagonal], dim=-1), dim=-1)
    out = probs[..., :length] @ heads(values[0])
    for j, v in enumerate(values[1:]):
        out = out + probs[..., length + j : length + j + 1] * heads(v)
    return out.transpose(1, 2).to(q.dtype)


def padded_ttt(draft: Eagle3Draft, batch: PaddedDraftBatch, steps: int) -> list[torch.Tensor]:
    """Eagle3Draft.ttt on a padded batch: the draft's hidden states [B, L, D] after each step. Step j reads the
    token at t + 1 + j of the row (zeros past the sample's end) at rotary positions advanced by j."""
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    index = torch.arange(length, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = causal & (index < batch.lengths.unsqueeze(1)).unsqueeze(1)  # [B, L, L]: no query sees padding
    hidden = draft.fuse(batch.aux)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outs = []
    for j in range(steps):
        source = index + 1 + j
        inside = source < batch.lengths.unsqueeze(1)  # [B, L]
        tokens = torch.where(inside, batch.input_ids[:, source.clamp(max=length - 1)], 0)
        cos, sin = rotary_cos_sin(draft.cfg, (batch.position_ids + j).flatten(1), device)
        cos, sin = cos.view(rows, length, -1), sin.view(rows, length, -1)
        q, k, v = draft.midlayer.qkv(draft.embed_tokens(tokens).to(hidden.dtype), hidden, cos, sin)
        keys.append(k)
        values.append(v)
        hidden = draft.midlayer.finish(hidden, padded_ttt_attention(q, keys, values, mask))
        outs.append(hidden)
    return outs


def padded_position_losses(draft: Eagle3Draft, batch: PaddedDraftBatch, steps: int) -> torch.Tensor:
    """Soft cross-entropy [K, B, L] of every position, zero where a step supervises nothing: the logits and the
    target's shifted distribution over every padded position, as the padded trainers compute them."""
    losses = []
    for j, hidden in enumerate(padded_ttt(draft, batch, steps)):
        logits = draft.logits(hidden).float()  # [B, L, N]
        target = batch.target_logits.roll(-(1 + j), dims=1)  # t reads t + 1 + j; wrapped rows are masked out
        per_position = -(torch.softmax(target, -1) * torch.log_softmax(logits, -1)).sum(-1)
        losses.append(per_position * batch.masks[j])
    return torch.stack(losses)


# ---------------------------------------------------------------- the check: same per-sample losses


def packed_sample_losses(draft: Eagle3Draft, batch: PackedDraftBatch, steps: int) -> torch.Tensor:
    """Each sample's loss sum of each TTT step [B, K], from the packed path (its ttt and logits)."""
    inputs, samples = batch.inputs, batch.cu_seqlens.numel() - 1
    out = torch.zeros(samples, steps, dtype=torch.float64, device=batch.input_ids.device)
    for j, hidden in enumerate(draft.ttt(batch.input_ids, inputs.aux, batch.position_ids, batch.cu_seqlens, steps)):
        rows = inputs.masks[j].nonzero().squeeze(-1)
        logits = draft.logits(hidden[rows]).float()
        target = torch.softmax(inputs.target_logits[rows + 1 + j], -1)
        ce = -(target * torch.log_softmax(logits, -1)).sum(-1)
        out[:, j].index_add_(0, batch.sample_index[rows], ce.double())
    return out


@torch.no_grad()
def check_losses(cfg: BenchConfig, data: BenchData, device: torch.device) -> dict[str, Any]:
    """Every sample's per-step loss, packed and padded, in float32 on the same draft; raises if they differ."""
    draft = new_draft_from(data, cfg, device)
    worst, largest, count = 0.0, 0.0, 0
    for packed, padded in zip(data.packed, data.padded):
        ours = packed_sample_losses(draft, packed, cfg.ttt_steps)
        theirs = padded_position_losses(draft, padded, cfg.ttt_steps).sum(-1).T.double()  # [B, K]
        worst = max(worst, float((ours - theirs).abs().max()))
        largest = max(largest, float(ours.abs().max()))
        count += ours.numel()
    relative = worst / largest if largest else 0.0
    result = {
        "per_sample_step_losses": count,
        "max_abs_diff": worst,
        "max_rel_diff": relative,
        "tolerance_rel": LOSS_TOLERANCE,
        "matched": relative <= LOSS_TOLERANCE,
    }
    if not result["matched"]:
        raise RuntimeError(f"packed and padded draft losses differ beyond {LOSS_TOLERANCE} (relative): {result}")
    return result


def new_draft_from(data: BenchData, cfg: BenchConfig, device: torch.device) -> Eagle3Draft:
    """The benchmark's draft with its initial weights (the same for both layouts)."""
    draft = new_draft(data.target, data.vocab_size, cfg)
    draft.load_state_dict(data.draft_state)
    return draft.to(device)


# ---------------------------------------------------------------- one layout


class Layout(TimedLayout):
    """One layout (packed or padded) of the benchmark samples: its own draft copy, optimizer and batches."""

    def __init__(self, cfg: BenchConfig, mode: str, data: BenchData | None = None) -> None:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.mode = cfg, mode
        self.device = pick_device(cfg.device)
        data = data or prepare(cfg, self.device)
        self.draft = new_draft_from(data, cfg, self.device).train()
        self.batches: list[PackedDraftBatch] | list[PaddedDraftBatch] = data.packed if mode == "packed" else data.padded
        self.lengths = data.lengths
        # The draft stage's normaliser: step j's loss sum over its supervised positions, weighted step_weight ** j.
        weights = torch.tensor([cfg.step_weight**j for j in range(cfg.ttt_steps)], device=self.device)
        self.scales = [weights / b.inputs.masks.sum(1).clamp(min=1) for b in data.packed]
        trained = [p for p in self.draft.parameters() if p.requires_grad]  # the embedding stays frozen
        self.optimizer = torch.optim.AdamW(trained, lr=1e-4)
        self.parameters = sum(p.numel() for p in trained)
        super().__init__(self.device, cfg.warmup, len(self.batches))

    def step(self, index: int) -> torch.Tensor:
        """Forward over the TTT steps, backward and an AdamW step of the draft on step `index`'s samples."""
        batch, steps = self.batches[index], self.cfg.ttt_steps
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.mode == "packed":
                out = draft_losses(self.draft, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.inputs)
                loss_sums = out.loss_sums
            else:
                loss_sums = padded_position_losses(self.draft, batch, steps).sum((1, 2))
        loss = (loss_sums.float() * self.scales[index]).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def figures(self, peak_memory_mb: float) -> dict[str, Any]:
        timed = self.lengths[self.cfg.warmup :]
        real = sum(sum(lengths) for lengths in timed)
        seconds = self.fastest_pass
        return {
            "mode": self.mode,
            "tokens_per_s": real / seconds,
            "step_time_ms": 1000 * seconds / self.cfg.steps,
            "pass_times_s": self.passes,
            "peak_memory_mb": peak_memory_mb,
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
            "real_tokens": real,
            "padded_tokens": sum(len(lengths) * max(lengths) for lengths in timed),
            "parameters": self.parameters,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }


def run_mode(cfg: BenchConfig, mode: str) -> dict[str, Any]:
    """One layout alone: warm-up, then --repeats timed passes; peak memory over all its steps."""
    return run_alone(Layout(cfg, mode), cfg.repeats)


def compare(cfg: BenchConfig, data: BenchData, isolate: bool) -> dict[str, Any]:
    """Both layouts on the same samples and target features, and their ratios."""
    if pick_device(cfg.device).type == "cuda":  # stable timings, and peaks reset per layout
        results = {mode: run_alone(Layout(cfg, mode, data), cfg.repeats) for mode in MODES}
    else:  # both in this process, their timed passes alternating so both see the same machine load
        make = {mode: functools.partial(Layout, cfg, mode, data) for mode in MODES}
        isolated = functools.partial(isolated_peak_memory, run_mode, cfg) if isolate else None
        results = run_alternating(make, cfg.repeats, isolated)
    packed, padded = results["packed"], results["padded"]
    return {
        "samples": cfg.rows * cfg.steps,
        "real_tokens": packed["real_tokens"],
        "padded_tokens": packed["padded_tokens"],
        "real_token_fraction": packed["real_tokens"] / packed["padded_tokens"],
        "packed": {k: packed[k] for k in FIGURES},
        "padded": {k: padded[k] for k in FIGURES},
        "speedup": packed["tokens_per_s"] / padded["tokens_per_s"],
        "memory_ratio": packed["peak_memory_mb"] / padded["peak_memory_mb"] if padded["peak_memory_mb"] else None,
        "first_loss_abs_diff": abs(packed["first_loss"] - padded["first_loss"]),
        "draft_parameters": packed["parameters"],
        "device": packed["device"],
        "threads": packed["threads"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    for name, value in asdict(defaults).items():
        choices = ("auto", "cpu", "cuda") if name == "device" else None
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, choices=choices)
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="CPU peak memory measured in this process, not in a fresh one per layout (then meaningful only for "
        "the first)",
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if min(cfg.rows, cfg.steps, cfg.repeats, cfg.ttt_steps, cfg.draft_vocab_size) <= 0 or cfg.warmup < 0:
        parser.error("--rows, --steps, --repeats, --ttt-steps and --draft-vocab-size must be positive, --warmup >= 0")
    if not 0 < cfg.min_side <= cfg.max_side or not 0 < cfg.min_words <= cfg.max_words:
        parser.error("need 0 < --min-side <= --max-side and 0 < --min-words <= --max-words")
    try:
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device: {error}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    isolate = not args.no_isolate and device.type == "cpu"  # CUDA peaks reset per layout; RSS peaks cannot
    if device.type == "cuda":
        memory_method = "torch.cuda.max_memory_allocated - allocated before the steps"
    else:
        where = "each layout in a fresh process" if isolate else "both layouts in one process"
        memory_method = f"peak RSS (VmHWM) growth over warm-up and one timed pass, {where}"
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "memory_method": memory_method,
        "timed": "the draft only: target features precomputed once (target_features, bf16)",
        "cpu_count": os.cpu_count(),
        "load_avg_before": list(os.getloadavg()),
    }
    data = prepare(cfg, device)
    result["loss_check"] = check_losses(cfg, data, device)
    result.update(compare(cfg, data, isolate))
    result["load_avg_after"] = list(os.getloadavg())
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
