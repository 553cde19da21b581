"""Packing benchmark: the realistic mix through the packer at several buffer sizes; one JSON object.

    python tools/bench_packing.py                                  # 100k samples, buffers 64/512/4096
    python tools/bench_packing.py --samples 20000 --buffers 64 512 --vit-budget 24576

It is `tools/pack_stats.py --lengths` over a freshly made mix (`tools/pack_mix.py`), swept over buffers, so
the README's packing table can be re-made with one command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

from vlm_train.data.pack_planner import Budget
from vlm_train.jsonio import dumps

try:
    from tools.pack_mix import write_mix
    from tools.pack_stats import length_items, simulate
except ModuleNotFoundError:  # run as a script: tools/ is on the path, the repository root may not be
    from pack_mix import write_mix
    from pack_stats import length_items, simulate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples in the generated mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buffers", type=int, nargs="+", default=[64, 512, 4096], help="packer buffer sizes")
    parser.add_argument("--llm-budget", type=int, default=8192)
    parser.add_argument("--vit-budget", type=int, default=32768)
    parser.add_argument("--max-images", type=int, default=0, help="images per pack (0: no limit)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.samples < 1 or any(b < 1 for b in args.buffers):
        print("bench_packing: --samples and every --buffers value must be >= 1", file=sys.stderr)
        return 2
    budget = Budget(args.llm_budget, args.vit_budget, args.max_images)
    with tempfile.TemporaryDirectory() as tmp:
        mix = os.path.join(tmp, "mix.jsonl")
        write_mix(mix, args.samples, args.seed)
        runs = {str(buffer): simulate(length_items(mix, budget), budget, buffer).summary() for buffer in args.buffers}
    print(
        dumps(
            {
                "samples": args.samples,
                "seed": args.seed,
                "llm_budget": args.llm_budget,
                "vit_budget": args.vit_budget,
                "buffers": runs,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
