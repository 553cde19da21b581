"""Speculative decoding with a run's Eagle3 draft, measured on held-out prompts: acceptance and speed-up.

    python tools/speculate.py outputs/draft --draft-tokens 4 --json
    python tools/speculate.py outputs/draft/checkpoints/step_00000300 --heldout 'val=/data/val-{0..3}.tar' \\
        --num-prompts 50 --temperature 0.7 --seed 1 --device cuda

The checkpoint holds the target VLM (model.safetensors) and its draft (draft.safetensors; train one with
curriculum=eagle3). Prompts: the first --num-prompts caption samples of the held-out shards (the run's own unless
--heldout), one at a time. Each round the draft proposes --draft-tokens tokens and the target verifies them in one
forward. The same prompts are then decoded by the target alone (KV-cache generation, one prompt at a time) for
the speed-up; greedily (temperature 0) the two outputs must be equal token for token. Prints JSON.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from vlm_train.cli.evaluate import configured_sets, parse_sets
from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.devices import dtype_of, inference_autocast, pick_device
from vlm_train.inference import Loaded, load, load_draft, read_eagle3_config
from vlm_train.jsonio import dumps
from vlm_train.model.draft import Eagle3Draft
from vlm_train.model.generate import SamplingConfig, generate
from vlm_train.model.speculative import SpeculativeOutput, SpeculativeStats, speculative_generate
from vlm_train.train.config import EvalConfig
from vlm_train.train.evaluator import select_heldout


def caption_prompts(encoder: Encoder, urls: list[str], count: int, max_decode_pixels: int) -> list[PackedBatch]:
    """Packs of one prompt each: the first `count` held-out caption samples, answers held out."""
    cfg = EvalConfig(num_caption=count, num_grounding=0)
    prompts = []
    for sample in select_heldout(urls, cfg, max_decode_pixels):
        try:
            prompts.append(collate([encoder.encode(sample, for_generation=True)]))
        except SkipSample:
            continue
    if not prompts:
        raise ValueError(f"no caption samples in the held-out shards ({len(urls)} shards): pass --heldout NAME=URLS")
    return prompts


def measure(
    loaded: Loaded, draft: Eagle3Draft, prompts: list[PackedBatch], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Decode every prompt with the draft, then with the target alone; acceptance, speed and agreement."""
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, 1.0, args.seed)
    special = loaded.encoder.special
    stops = {special.im_end, special.pad}
    feature_dtype = dtype_of(read_eagle3_config(loaded.path).hidden_dtype)
    model = loaded.model

    def speculate(prompt: PackedBatch, cfg: SamplingConfig) -> SpeculativeOutput:
        return speculative_generate(model, draft, prompt.to(device), cfg, stops, args.draft_tokens, feature_dtype)

    def plain(prompt: PackedBatch, cfg: SamplingConfig) -> list[int]:
        return generate(model, prompt.to(device), cfg, stops)[0]

    with inference_autocast(device, model):
        warm = SamplingConfig(2, args.temperature, 1.0, args.seed)  # first-call costs stay out of the timing
        speculate(prompts[0], warm)
        plain(prompts[0], warm)
        stats = SpeculativeStats(args.draft_tokens)
        started = time.perf_counter()
        drafted = []
        for prompt in prompts:
            out = speculate(prompt, sampling)
            stats.add(out.stats)
            drafted.append(out.tokens)
        speculative_seconds = time.perf_counter() - started
        started = time.perf_counter()
        reference = [plain(prompt, sampling) for prompt in prompts]
        plain_seconds = time.perf_counter() - started
    greedy = args.temperature == 0
    differ = [i for i, (a, b) in enumerate(zip(drafted, reference)) if a != b]
    new_tokens = sum(len(t) for t in drafted)
    plain_tokens = sum(len(t) for t in reference)
    speed = new_tokens / speculative_seconds if speculative_seconds > 0 else None
    plain_speed = plain_tokens / plain_seconds if plain_seconds > 0 else None
    return {
        "acceptance_length": stats.acceptance_length,
        "accept_rate_per_position": stats.accept_rate_per_position,
        "identical_to_greedy": (not differ) if greedy else None,
        "differing_prompts": differ if greedy else None,
        "tokens_per_s": {"speculative": speed, "target_only": plain_speed},
        "speedup": speed / plain_speed if speed and plain_speed else None,
        "verifications": stats.verifications,
        "new_tokens": new_tokens,
        "target_only_new_tokens": plain_tokens,
        "speculative_seconds": speculative_seconds,
        "target_only_seconds": plain_seconds,
    }


def summary_line(result: dict[str, Any]) -> str:
    """The figures a person reads first, on one line."""
    rates = ", ".join("n/a" if r is None else f"{r:.2f}" for r in result["accept_rate_per_position"])
    length, speedup, same = result["acceptance_length"], result["speedup"], result["identical_to_greedy"]
    line = (
        f"{result['prompts']} prompts, K={result['draft_tokens']}: acceptance length "
        f"{'n/a' if length is None else f'{length:.2f}'} tokens per target forward (per position: {rates}), "
        f"speed-up {'n/a' if speedup is None else f'{speedup:.2f}x'}"
    )
    return line if same is None else f"{line}, identical to greedy: {same}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder or checkpoints/step_XXXXXXXX folder with draft.safetensors")
    parser.add_argument(
        "--target",
        default=None,
        help="the draft's target, a run or checkpoint folder (default: the VLM saved with the draft; an offline "
        "draft run, eagle3.offline, saved only the target's shape: give its target here)",
    )
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round (K)")
    parser.add_argument("--heldout", action="append", default=[], help="NAME=URLS held-out shards (repeatable)")
    parser.add_argument("--num-prompts", type=int, default=100, help="held-out caption prompts decoded")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    parser.add_argument("--attn-backend", default=None, help="override the checkpoint's attention backend")
    parser.add_argument("--max-decode-pixels", type=int, default=None, help="skip larger images (default: training's)")
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    if args.draft_tokens < 1 or args.num_prompts < 1:
        raise ValueError(f"--draft-tokens and --num-prompts must be >= 1, got {args.draft_tokens}, {args.num_prompts}")
    SamplingConfig(args.max_new_tokens, args.temperature).validate()

    started = time.perf_counter()
    device = pick_device(args.device)
    loaded = load(args.target or args.checkpoint, device, args.dtype, args.attn_backend)
    if loaded.kind != "vlm_train" and not args.target:
        raise ValueError(f"{args.checkpoint} is a Hugging Face folder: give one of our runs with a draft stage")
    draft = load_draft(args.checkpoint, loaded.model)
    sets = parse_sets(args.heldout, args.allow_pipe) if args.heldout else configured_sets(loaded.data, loaded.path)
    max_decode = args.max_decode_pixels or (
        loaded.data.image.max_decode_pixels if loaded.data else DataConfig().image.max_decode_pixels
    )
    urls = [u for group in sets.values() for u in group]
    prompts = caption_prompts(loaded.encoder, urls, args.num_prompts, max_decode)
    with torch.no_grad():
        measured = measure(loaded, draft, prompts, args, device)
    result = {
        "checkpoint": str(loaded.path),
        "draft_tokens": args.draft_tokens,
        "prompts": len(prompts),
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "device": str(device),
        "draft_vocab_size": draft.draft_vocab_size,
        "target_layers": list(draft.target_layers),
        **measured,
        "seconds": time.perf_counter() - started,
    }
    if not args.json:
        print(summary_line(result))
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
