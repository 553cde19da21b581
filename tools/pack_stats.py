"""Packing efficiency of a data set, through the packer's own algorithm: real shards or a file of sample sizes.

    python tools/pack_stats.py --make-mix /tmp/mix.jsonl --samples 100000 --seed 0
    python tools/pack_stats.py --lengths /tmp/mix.jsonl --llm-budget 8192 --vit-budget 32768 --buffer 512 --json
    python tools/pack_stats.py --shards '/data/cc3m/{00000..00009}.tar' --llm-budget 4096 --vit-budget 16384 --json

A lengths file holds one JSON object per sample: {"llm_tokens": int, "vit_patches": int} and optionally "images"
(default: 1 if it has patches). Shards are decoded and encoded as in training (tiny tokenizer unless --tokenizer),
and only their sizes go through the packer, so a large buffer needs no pixel memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from vlm_train.data.pack_planner import SKIP_REASONS, Budget, Item, PackPlanner
from vlm_train.jsonio import dumps

try:
    from tools.pack_mix import write_mix
except ModuleNotFoundError:  # run as a script: tools/ is on the path, the repository root may not be
    from pack_mix import write_mix

SIZE_FIELDS = ("llm_tokens", "vit_patches")


@dataclass
class PackStats:
    """What a packing run produced: per-pack fills, drops, and the time spent choosing packs."""

    budget: Budget
    buffer: int
    token_fills: list[int] = field(default_factory=list)  # LLM tokens of each pack, in order
    patch_fills: list[int] = field(default_factory=list)
    samples_per_pack: list[int] = field(default_factory=list)
    steady_packs: int = 0  # packs made before the end-of-stream flush
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    max_wait: int = 0  # most packs a sample waited in the buffer
    pack_seconds: float = 0.0
    encode_seconds: float = 0.0  # decode + encode, real shards only

    def add(self, packs: list[list[Item]], arrivals: dict[int, int]) -> None:
        for pack in packs:
            self.token_fills.append(sum(i.tokens for i in pack))
            self.patch_fills.append(sum(i.patches for i in pack))
            self.samples_per_pack.append(len(pack))
            for item in pack:
                self.max_wait = max(self.max_wait, len(self.token_fills) - arrivals.pop(item.payload))

    def summary(self) -> dict:
        packs = len(self.token_fills)
        steady = self.token_fills[: self.steady_packs]
        fills = sorted(t / self.budget.tokens for t in self.token_fills)
        per_pack_ms = lambda seconds: round(1000 * seconds / max(packs, 1), 4)
        # No packing can use fewer packs than this: all tokens (or patches) over the budget, rounded up.
        tokens, patches = sum(self.token_fills), sum(self.patch_fills)
        lower_bound = max(-(-tokens // self.budget.tokens), -(-patches // self.budget.patches))
        result = {
            "efficiency": tokens / max(packs * self.budget.tokens, 1),
            "vit_efficiency": patches / max(packs * self.budget.patches, 1),
            "steady_efficiency": sum(steady) / max(len(steady) * self.budget.tokens, 1),
            "packs": packs,
            "samples": sum(self.samples_per_pack),
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "truncated": self.truncated,
            "samples_per_pack": sum(self.samples_per_pack) / max(packs, 1),
            "fill_p1": fills[len(fills) // 100] if fills else 0.0,
            "fill_p50": fills[len(fills) // 2] if fills else 0.0,
            "full_packs": sum(t == self.budget.tokens for t in self.token_fills) / max(packs, 1),
            "flush_packs": packs - self.steady_packs,
            "lower_bound_packs": lower_bound,
            "max_wait_packs": self.max_wait,
            "pack_ms_per_pack": per_pack_ms(self.pack_seconds),
            "llm_budget": self.budget.tokens,
            "vit_budget": self.budget.patches,
            "max_images": self.budget.images,
            "buffer": self.buffer,
        }
        if self.encode_seconds:
            result["encode_ms_per_pack"] = per_pack_ms(self.encode_seconds)
            result["pack_cost_share"] = self.pack_seconds / self.encode_seconds
        return result


def simulate(
    items: Iterator[tuple[Item | None, str | None, float]], budget: Budget, buffer: int, stats: PackStats | None = None
) -> PackStats:
    """Run (item, drop reason, encode seconds) through PackPlanner; the packing time alone is measured.

    Each item's payload becomes its index in `items`; `stats` (a PackStats, or a subclass that also looks at the
    packs) collects the figures.
    """
    stats = PackStats(budget, buffer) if stats is None else stats
    packer = PackPlanner(budget, buffer)
    arrivals: dict[int, int] = {}
    for index, (item, reason, encode_seconds) in enumerate(items):
        stats.encode_seconds += encode_seconds
        if item is None:
            stats.dropped[reason] += 1
            continue
        stats.truncated += reason == "truncated"
        item.payload = index
        arrivals[index] = len(stats.token_fills)
        start = time.perf_counter()
        packs = packer.push(item)
        stats.pack_seconds += time.perf_counter() - start
        stats.add(packs, arrivals)
    stats.steady_packs = len(stats.token_fills)
    start = time.perf_counter()
    packs = packer.flush()
    stats.pack_seconds += time.perf_counter() - start
    stats.add(packs, arrivals)
    return stats


def length_items(path: str, budget: Budget) -> Iterator[tuple[Item | None, str | None, float]]:
    """Items of a lengths file; a sample over a budget is dropped (truncation needs the real token layout)."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                tokens, patches = (int(record[k]) for k in SIZE_FIELDS)
                images = int(record.get("images", 1 if patches else 0))
            except (ValueError, KeyError, TypeError) as exc:
                expected = '{"llm_tokens": int, "vit_patches": int}'
                raise ValueError(f"{path}:{number}: expected {expected}: {exc!r}") from exc
            if tokens < 1 or patches < 0 or images < 0:
                raise ValueError(f"{path}:{number}: llm_tokens must be >= 1 and vit_patches, images >= 0")
            over = budget.overflow(tokens, patches, images)
            yield (None, SKIP_REASONS[over], 0.0) if over else (Item(tokens, patches, images), None, 0.0)


def shard_items(args: argparse.Namespace, budget: Budget) -> Iterator[tuple[Item | None, str | None, float]]:
    """Items of real shards, decoded and encoded as in training, then checked by the Packer's policy."""
    from vlm_train.data.config import DataConfig
    from vlm_train.data.decode import SkipSample
    from vlm_train.data.encode import Encoder
    from vlm_train.data.loader import expand_urls, iter_samples
    from vlm_train.data.packer import PackConfig, Packer
    from vlm_train.data.synthetic import corpus_lines
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.model.config import ModelConfig
    from vlm_train.train.builders import patch_spec

    data = DataConfig(tokenizer=args.tokenizer)
    data.image.min_pixels, data.image.max_pixels = args.min_pixels, args.max_pixels
    encoder = Encoder(load_tokenizer(data.tokenizer, corpus=corpus_lines()), patch_spec(ModelConfig(), data))
    cfg = PackConfig(budget.tokens, budget.patches, budget.images, args.buffer, args.too_long)
    checker = Packer(cfg, special=encoder.special)
    urls = [url for pattern in args.shards for url in expand_urls(pattern)]
    factor = encoder.spec.patch_size * encoder.spec.merge_size
    samples = iter_samples(urls, "shards", data.image.max_decode_pixels, args.format, video=data.video, factor=factor)
    for _ in range(args.max_samples or sys.maxsize):
        start = time.perf_counter()
        sample = next(samples, None)
        if sample is None:
            return
        encoded = encoder.encode(sample)
        seconds = time.perf_counter() - start
        try:
            packed = checker.check(encoded)
        except SkipSample as exc:
            yield None, exc.reason, seconds
            continue
        item = Item(packed.num_tokens, packed.num_patches, int(packed.image_grid_thw.shape[0]))
        yield item, "truncated" if packed is not encoded else None, seconds


def plot(stats: PackStats, path: str) -> None:
    """Histograms of the LLM and ViT fill of every pack."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, fills, budget, name in [
        (axes[0], stats.token_fills, stats.budget.tokens, "LLM tokens"),
        (axes[1], stats.patch_fills, stats.budget.patches, "ViT patches"),
    ]:
        axis.hist([100 * f / budget for f in fills], bins=50, color="tab:blue")
        axis.set_xlabel(f"{name} used, % of {budget}")
        axis.set_ylabel("packs")
        axis.set_yscale("log")
    summary = stats.summary()
    figure.suptitle(
        f"{summary['packs']} packs, buffer {stats.buffer}: efficiency {summary['efficiency']:.4f}, "
        f"ViT {summary['vit_efficiency']:.3f}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lengths", metavar="FILE", help="JSONL of {llm_tokens, vit_patches[, images]} per sample")
    source.add_argument("--shards", metavar="URLS", nargs="+", help="tar shards (brace patterns)")
    source.add_argument("--make-mix", metavar="FILE", help="write a realistic mix of sizes (see tools/pack_mix.py)")
    parser.add_argument("--samples", type=int, default=100_000, help="samples for --make-mix")
    parser.add_argument("--seed", type=int, default=0, help="seed for --make-mix")
    parser.add_argument("--video-share", type=float, default=0.0, help="share of video samples in --make-mix")
    parser.add_argument("--llm-budget", type=int, default=8192)
    parser.add_argument("--vit-budget", type=int, default=32768)
    parser.add_argument("--max-images", type=int, default=0, help="images per pack (0: no limit)")
    parser.add_argument("--buffer", type=int, default=512, help="samples the packer holds")
    parser.add_argument("--too-long", choices=["drop", "truncate"], default="drop", help="shards only")
    parser.add_argument("--max-samples", type=int, default=0, help="stop after this many shard samples (0: all)")
    parser.add_argument("--format", default="auto", help="shard format (auto | caption | conversation | ...)")
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' or a local Hugging Face tokenizer folder")
    parser.add_argument("--min-pixels", type=int, default=56 * 56)
    parser.add_argument("--max-pixels", type=int, default=1024 * 28 * 28)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the fill histograms")
    args = parser.parse_args(argv)
    if args.lengths and args.too_long == "truncate":
        parser.error("--too-long truncate needs real shards: a lengths file has no token layout to cut")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_mix:
        write_mix(args.make_mix, args.samples, args.seed, args.video_share)
        print(dumps({"wrote": args.make_mix, "samples": args.samples, "seed": args.seed, "video": args.video_share}))
        return 0
    try:
        budget = Budget(args.llm_budget, args.vit_budget, args.max_images)
        items = length_items(args.lengths, budget) if args.lengths else shard_items(args, budget)
        stats = simulate(items, budget, args.buffer)
    except (ValueError, OSError) as exc:
        print(f"pack_stats: {exc}", file=sys.stderr)
        return 2
    summary = stats.summary()
    if args.plot:
        plot(stats, args.plot)
    if args.json:
        print(dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
