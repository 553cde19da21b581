"""Rank balance: how unevenly packs and data-parallel ranks load the GPUs, in training FLOPs; one JSON object.

    python tools/bench_rank_balance.py                           # Qwen2.5-VL-3B, 64 streams, FLOPs corridor off/0.002
    python tools/bench_rank_balance.py --corridors 0 0.02 0.05 0.1 --samples-per-rank 1500

Each data-parallel rank reads its own shards and packs its own stream, so a step's ranks get whatever packs their
packers made. The realistic mix (tools/pack_mix.py) is dealt into `--ranks` streams; each goes through the packer
(PackPlanner, as in training) alone, and every pack gets its training FLOPs at the model's shapes by the formulas of
vlm_train/model/flops.py. For W ranks x M micro-batches per step, rank r trains on the next M packs of stream r.
Reported per FLOPs corridor (data.pack.flops_corridor; 0: off), over the packs made before the end-of-stream
flush (a training stream never ends):
- pack_max_over_mean, pack_p99_over_mean, pack_cv: the heaviest pack, the 99th percentile, std/mean;
- steps["W{w}xM{m}"]: rank_max_over_mean (mean over steps of heaviest rank / mean rank), its worst step, and
  utilisation (mean over steps of mean rank / heaviest rank: the share of the step the GPUs compute);
- efficiency (LLM tokens / (packs x budget)) over those packs and over all packs, flush included;
- max_wait_packs (the most packs a sample waited), buffered_tokens and buffered_patches (what one packer
  holds, on average once packing started: its pixels are 588 bytes per patch), and pack_ms_per_pack (the time
  spent choosing packs).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import yaml

import vlm_train.conf
from vlm_train.data.pack_planner import SKIP_REASONS, Budget, FlopsTarget, Item
from vlm_train.jsonio import dumps
from vlm_train.model.config import ModelConfig
from vlm_train.model.flops import flops_cost, llm_flops, sizes_flops, vision_flops

try:
    from tools.pack_mix import make_mix
    from tools.pack_stats import PackStats, simulate
except ModuleNotFoundError:  # run as a script: tools/ is on the path, the repository root may not be
    from pack_mix import make_mix
    from pack_stats import PackStats, simulate

QWEN_VOCAB = 151936
CHECKED_PACKS = 50  # packs whose FLOPs are also computed by sizes_flops in one piece


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a model preset (conf/model/NAME.yaml with its vision and llm parts)."""
    root = Path(vlm_train.conf.__file__).parent / "model"
    path = root / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no model preset {name!r} in {root}")
    preset = yaml.safe_load(path.read_text())
    parts = {k: v for entry in preset.pop("defaults", []) if isinstance(entry, dict) for k, v in entry.items()}
    data = {**preset, **{part: yaml.safe_load((root / part / f"{parts[part]}.yaml").read_text()) for part in parts}}
    cfg = ModelConfig.from_dict(data)
    cfg.validate()
    cfg.llm.vocab_size = cfg.llm.vocab_size or QWEN_VOCAB  # 0 there means: the tokenizer's
    return cfg


@dataclass
class _Recorder(PackStats):
    """PackStats that also keeps each pack's item indices, and every 64 samples what the buffer holds."""

    records: list[dict] = field(default_factory=list)
    packs: list[list[int]] = field(default_factory=list)
    buffered: list[tuple[int, int]] = field(default_factory=list)  # (tokens, patches)
    calls: int = 0

    def add(self, packs: list[list[Item]], arrivals: dict[int, int]) -> None:
        self.packs += [[item.payload for item in pack] for pack in packs]
        super().add(packs, arrivals)  # arrivals: then the buffered samples
        self.calls += 1  # once per sample
        if self.packs and self.calls % 64 == 0:
            held = [self.records[i] for i in arrivals]
            self.buffered.append((sum(r["llm_tokens"] for r in held), sum(r["vit_patches"] for r in held)))


class PackFlopsOf:
    """Training FLOPs of a pack of mix records: llm_flops per pack, vision_flops per image (its terms are per
    image, so the sum over a pack's images is the pack's), the LM head on the supervised tokens."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        no_image = sizes_flops(cfg, [], 1, torch.zeros(0, 3, dtype=torch.long))
        self.head, self.no_image = no_image.lm_head, no_image.vision + no_image.projector
        self.image = cache(lambda grid: sum(vision_flops(cfg, torch.tensor([grid]))))

    def __call__(self, records: list[dict]) -> int:
        grids = [tuple(g) for r in records for g in r["grids"]]
        vision = sum(map(self.image, grids)) if grids else self.no_image
        llm = llm_flops(self.cfg, [r["llm_tokens"] for r in records])
        return 3 * (vision + llm + self.head * sum(r["supervised"] for r in records))

    def exact(self, records: list[dict]) -> int:
        """The same through sizes_flops on the whole pack at once (what pack_flops computes from a PackedBatch)."""
        grids = torch.tensor([g for r in records for g in r["grids"]], dtype=torch.long).reshape(-1, 3)
        lengths = [r["llm_tokens"] for r in records]
        return sizes_flops(self.cfg, lengths, sum(r["supervised"] for r in records), grids).training


def record_items(records: list[dict], budget: Budget) -> Iterator[tuple[Item | None, str | None, float]]:
    """Items of mix records (with the sizes the FLOPs cost needs); a record over a budget is dropped."""
    for r in records:
        over = budget.overflow(r["llm_tokens"], r["vit_patches"], r["images"])
        if over:
            yield None, SKIP_REASONS[over], 0.0
            continue
        grids = tuple(tuple(g) for g in r["grids"])
        yield Item(r["llm_tokens"], r["vit_patches"], r["images"], supervised=r["supervised"], grids=grids), None, 0.0


def _checked(flops: int, members: list[dict], flops_of: PackFlopsOf, budget: Budget) -> None:
    """The pack's FLOPs equal sizes_flops on the whole pack, and the packer's own cost model when it has one."""
    if flops != flops_of.exact(members):
        raise AssertionError(f"per-image FLOPs differ from sizes_flops on a pack of {len(members)} samples")
    if budget.flops is not None:
        cost = budget.flops.cost
        grids = [tuple(map(tuple, r["grids"])) for r in members]
        modelled = sum(
            cost.sample(r["llm_tokens"], r["supervised"], r["vit_patches"], g) for r, g in zip(members, grids)
        )
        if flops != modelled + cost.no_image * (not any(grids)):
            raise AssertionError(
                f"the packer's FLOPs cost differs from sizes_flops on a pack of {len(members)} samples"
            )


def _run(streams: list[list[dict]], budget: Budget, buffer: int, flops_of: PackFlopsOf, args) -> dict:
    start = time.perf_counter()
    per_rank: list[list[int]] = []  # steady packs' FLOPs, per stream
    steady_tokens = steady_packs = all_tokens = all_packs = checked = max_wait = 0
    pack_seconds = 0.0
    buffered: list[tuple[int, int]] = []
    for records in streams:
        stats = simulate(record_items(records, budget), budget, buffer, _Recorder(budget, buffer, records=records))
        flops = []
        for pack in stats.packs[: stats.steady_packs]:
            members = [records[i] for i in pack]
            flops.append(flops_of(members))
            if checked < CHECKED_PACKS and len(flops) % 7 == 1:
                _checked(flops[-1], members, flops_of, budget)
                checked += 1
        per_rank.append(flops)
        steady_tokens += sum(stats.token_fills[: stats.steady_packs])
        steady_packs += stats.steady_packs
        all_tokens += sum(stats.token_fills)
        all_packs += len(stats.token_fills)
        pack_seconds += stats.pack_seconds
        max_wait = max(max_wait, stats.max_wait)
        buffered += stats.buffered
    every = sorted(f for flops in per_rank for f in flops)
    mean = sum(every) / len(every)
    std = math.sqrt(sum((f - mean) ** 2 for f in every) / len(every))
    result = {
        "pack_max_over_mean": round(every[-1] / mean, 4),
        "pack_p99_over_mean": round(every[len(every) * 99 // 100] / mean, 4),
        "pack_min_over_mean": round(every[0] / mean, 4),
        "pack_cv": round(std / mean, 4),
        "mean_pack_tflops": round(mean / 1e12, 2),
        "steps": {},
        "efficiency": round(steady_tokens / (steady_packs * budget.tokens), 5),
        "efficiency_with_flush": round(all_tokens / (all_packs * budget.tokens), 5),
        "packs": steady_packs,
        "flush_packs": all_packs - steady_packs,
        "max_wait_packs": max_wait,
        "buffered_tokens": round(sum(t for t, _ in buffered) / len(buffered)),
        "buffered_patches": round(sum(p for _, p in buffered) / len(buffered)),
        "pack_ms_per_pack": round(1000 * pack_seconds / all_packs, 3),
        "checked_packs": checked,
    }
    for world in args.worlds:
        for micro in args.micro:
            ranks = per_rank[:world]
            steps = min(len(flops) for flops in ranks) // micro
            if steps == 0:
                raise ValueError(f"too few packs per rank for {micro} micro-batches: raise --samples-per-rank")
            ratios = []
            for step in range(steps):
                loads = [sum(flops[step * micro : (step + 1) * micro]) for flops in ranks]
                ratios.append(max(loads) * world / sum(loads))
            result["steps"][f"W{world}xM{micro}"] = {
                "rank_max_over_mean": round(sum(ratios) / steps, 4),
                "worst_step": round(max(ratios), 4),
                "utilisation": round(sum(1 / r for r in ratios) / steps, 4),
                "steps": steps,
            }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_3b", help="model preset (conf/model/NAME.yaml)")
    parser.add_argument("--ranks", type=int, default=64, help="streams (one per rank); the most --worlds may use")
    parser.add_argument("--samples-per-rank", type=int, default=2500, help="mix samples each stream gets")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mix")
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64], help="data-parallel world sizes")
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 4], help="micro-batches (packs) per rank per step")
    parser.add_argument("--corridors", type=float, nargs="+", default=[0.0, 0.002], help="FLOPs corridors; 0: off")
    parser.add_argument("--llm-budget", type=int, default=8192)
    parser.add_argument("--vit-budget", type=int, default=32768)
    parser.add_argument("--max-images", type=int, default=0, help="images per pack (0: no limit)")
    parser.add_argument("--buffer", type=int, default=512, help="samples each packer holds")
    args = parser.parse_args(argv)
    if min(args.worlds) < 1 or max(args.worlds) > args.ranks or min(args.micro) < 1:
        parser.error("--worlds must be within 1..--ranks and --micro >= 1")
    if args.samples_per_rank < 1 or min(args.corridors) < 0:
        parser.error("--samples-per-rank must be >= 1 and --corridors >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = preset_config(args.model)
    except ValueError as exc:
        print(f"bench_rank_balance: {exc}", file=sys.stderr)
        return 2
    mix = make_mix(args.ranks * args.samples_per_rank, args.seed)
    streams = [mix[rank :: args.ranks] for rank in range(args.ranks)]  # each rank reads its own share
    cost, flops_of = flops_cost(cfg), PackFlopsOf(cfg)
    runs = {}
    for corridor in args.corridors:
        target = FlopsTarget(cost, corridor) if corridor > 0 else None
        budget = Budget(args.llm_budget, args.vit_budget, args.max_images, target)
        runs[str(corridor)] = _run(streams, budget, args.buffer, flops_of, args)
    settings = {k: getattr(args, k) for k in ("model", "ranks", "samples_per_rank", "seed", "llm_budget", "vit_budget")}
    print(dumps({**settings, "max_images": args.max_images, "buffer": args.buffer, "corridors": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
