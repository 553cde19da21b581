"""Held-out evaluation of a checkpoint: loss per source and task, caption exact match, grounding accuracy.

    vlm-evaluate outputs/run                         # the run's own held-out shards
    vlm-evaluate outputs/run --heldout 'shapes=/data/shapes/heldout-{000..003}.tar' \\
        --heldout 'cc3m=/data/cc3m/val-{00000..00009}.tar' --num-loss 500 --predictions preds.jsonl
    vlm-evaluate /models/Qwen2.5-VL-3B-Instruct --heldout /data/refcoco-val.tar --num-caption 0

Loss: mean token cross-entropy of the first --num-loss samples of each held-out set (NAME=URLS; a bare URL
pattern is named "heldout"). Scores: greedy answers to the first --num-caption caption and --num-grounding
grounding samples; a caption counts when it equals the reference exactly, a box when IoU >= 0.5. Without
--heldout, the checkpoint's training config says where its held-out shards are. Prints JSON.
The same evaluation runs inside training (eval.interval, eval.at_stage_end, and at the end): HeldoutEvaluator.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vlm_train.data.config import DataConfig
from vlm_train.data.sources import expand_urls
from vlm_train.devices import pick_device
from vlm_train.inference import load
from vlm_train.jsonio import dumps
from vlm_train.train.config import EvalConfig
from vlm_train.train.evaluator import DEFAULT_SET, HeldoutEvaluator, write_predictions


def parse_sets(specs: list[str], allow_pipe: bool = False) -> dict[str, list[str]]:
    """NAME=URLS or URLS (named "heldout") -> {name: expanded urls}; a name given twice is an error."""
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, urls = spec.partition("=")
        if not sep or "/" in name or not name:
            name, urls = DEFAULT_SET, spec
        if name in sets:
            raise ValueError(f"held-out set {name!r} given twice: name each set, NAME=URLS")
        sets[name] = expand_urls(urls, allow_pipe)
    return sets


def configured_sets(data: DataConfig | None, checkpoint: Path) -> dict[str, list[str]]:
    """The held-out shards a run was trained with: data.heldout_urls, else the synthetic sets' (images, videos)."""
    if data is not None and data.heldout_urls:
        return {DEFAULT_SET: expand_urls(data.heldout_urls, data.allow_pipe)}
    sets = {}
    if data is not None and data.use_synthetic:
        from vlm_train.data.synthetic import ensure_synthetic_shards

        sets["shapes"] = ensure_synthetic_shards(data.synthetic).heldout_urls
    if data is not None and data.use_synthetic_video:
        from vlm_train.data.synthetic_video import ensure_synthetic_video_shards

        sets["shapes_video"] = ensure_synthetic_video_shards(data.synthetic_video).heldout_urls
    if sets:
        return sets
    raise ValueError(f"{checkpoint}: its config names no held-out shards; pass --heldout NAME=URLS")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder, checkpoints/step_XXXXXXXX folder, or Hugging Face folder")
    parser.add_argument("--heldout", action="append", default=[], help="NAME=URLS held-out shards (repeatable)")
    parser.add_argument("--num-loss", type=int, default=200, help="samples per set for the loss (0: no loss)")
    parser.add_argument(
        "--num-caption", type=int, default=EvalConfig.num_caption, help="caption samples scored by exact match"
    )
    parser.add_argument(
        "--num-grounding", type=int, default=EvalConfig.num_grounding, help="grounding samples scored by IoU >= 0.5"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts-per-pack", type=int, default=64, help="prompts generated together")
    parser.add_argument("--tokens-per-pack", type=int, default=4096, help="LLM tokens per pack for the loss")
    parser.add_argument("--predictions", default=None, help="write every prediction to this JSONL file")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    parser.add_argument("--attn-backend", default=None, help="override the checkpoint's attention backend")
    parser.add_argument("--max-decode-pixels", type=int, default=None, help="skip larger images (default: training's)")
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    loaded = load(args.checkpoint, device, args.dtype, args.attn_backend)
    sets = parse_sets(args.heldout, args.allow_pipe) if args.heldout else configured_sets(loaded.data, loaded.path)
    max_decode = args.max_decode_pixels or (
        loaded.data.image.max_decode_pixels if loaded.data else DataConfig().image.max_decode_pixels
    )
    cfg = EvalConfig(
        num_loss=args.num_loss,
        tokens_per_pack=args.tokens_per_pack,
        num_caption=args.num_caption,
        num_grounding=args.num_grounding,
        max_new_tokens=args.max_new_tokens,
        prompts_per_pack=args.prompts_per_pack,
    )
    # held-out videos are sampled by the run's data.video (frame rate, frame and pixel budgets), as in training
    evaluator = HeldoutEvaluator(sets, loaded.encoder, cfg, max_decode, loaded.data.video if loaded.data else None)
    started = time.perf_counter()
    result = evaluator.evaluate(loaded.model, device)
    summary: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "kind": loaded.kind,
        "sets": {name: len(urls) for name, urls in sets.items()},
        **result.metrics,
        "seconds": time.perf_counter() - started,
    }
    if args.predictions:
        write_predictions(result.predictions, Path(args.predictions))
        summary["predictions"] = args.predictions
    print(dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
