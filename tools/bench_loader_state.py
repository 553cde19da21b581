"""Loader state per pack: what a loader worker sends the main process with each pack so that the main process knows
the worker's exact state (shuffle and packing buffers as restore keys, cursors, generators, skip counts).

Before: the worker's whole state, pickled with every pack. Now: a change to the previous pack's state (each restore
key once, with a small id; lists of keys as arrays of ids; only the parts that changed). Runs one reader slot in this
process on the built-in synthetic shards (made once in the cache: --cache-dir, else $VLM_TRAIN_CACHE, else
~/.cache/vlm_train) for two settings, and prints JSON: bytes per pack (mean) and milliseconds per pack (median; other
processes on the cores make them higher), on the worker's side (state_dict, encode, pickle) and the main process's
(unpickle, apply), before and now.

    python tools/bench_loader_state.py
    python tools/bench_loader_state.py --packs 40 --settings default
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import statistics
import time
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from vlm_train.data.config import DataConfig
from vlm_train.data.encode import Encoder
from vlm_train.data.image import PatchSpec
from vlm_train.data.loader import PackedStream, Source
from vlm_train.data.state import find_restore_keys
from vlm_train.data.synthetic import SyntheticConfig, corpus_lines, ensure_synthetic_shards
from vlm_train.data.tokenizer import load_tokenizer
from vlm_train.data.worker_state import StateReceiver, StateSender
from vlm_train.jsonio import dumps


def default_config(cache_dir: str) -> DataConfig:
    """conf/data/synthetic.yaml: two sources, shuffle_buffer 256, pack buffer 64, budgets 1024 / 4096."""
    cfg = DataConfig(use_synthetic=True, num_workers=1, shuffle_buffer=256)
    cfg.synthetic = SyntheticConfig(min_side=56, max_side=112, side_step=28, cache_dir=cache_dir)
    cfg.image.min_pixels, cfg.image.max_pixels = 56 * 56, 112 * 112
    cfg.pack.llm_budget, cfg.pack.vit_budget, cfg.pack.buffer_size = 1024, 4096, 64
    return cfg


def large_config(cache_dir: str) -> DataConfig:
    """A larger run: four sources, shuffle_buffer 1000 each, pack buffer 256, budgets 8192 / 32768."""
    cfg = default_config(cache_dir)
    cfg.shuffle_buffer = 1000
    cfg.pack = replace(cfg.pack, llm_budget=8192, vit_budget=32768, buffer_size=256)
    return cfg


def sources(cfg: DataConfig, count: int) -> list[Source]:
    shards = ensure_synthetic_shards(cfg.synthetic)
    pairs = [(shards.caption_urls, 3.0), (shards.grounding_urls, 1.0)]
    return [Source(f"source{i}", *pairs[i % 2]) for i in range(count)]


def ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds), 3)


def measure(name: str, cfg: DataConfig, source_count: int, packs: int, warmup: int) -> dict[str, Any]:
    tokenizer = load_tokenizer(cfg.tokenizer, corpus=corpus_lines())
    spec = PatchSpec(min_pixels=cfg.image.min_pixels, max_pixels=cfg.image.max_pixels)
    encoder = Encoder(tokenizer, spec, cfg.image.sampling())
    stream = PackedStream(sources(cfg, source_count), encoder, cfg, seed=0, rank=0, world_size=1).slot_stream(0, 1)
    sender, receiver = StateSender(), StateReceiver()
    sizes: dict[str, list[int]] = {k: [] for k in ("json", "before", "now", "rest", "keys")}
    times: dict[str, list[float]] = {k: [] for k in ("state", "worker_before", "main_before", "worker_now", "main_now")}
    times["expand"] = []
    for i in range(warmup + packs):
        pack = stream.next_pack()
        clock = [time.perf_counter()]
        state = stream.state_dict()  # in the worker, before and now
        clock.append(time.perf_counter())
        before = ForkingPickler.dumps({"worker": 0, "state": state})  # before: the whole state, every pack
        clock.append(time.perf_counter())
        pickle.loads(before)
        clock.append(time.perf_counter())
        now = ForkingPickler.dumps({"worker": 0, **sender.encode(state)})  # now: the change since the last pack
        clock.append(time.perf_counter())
        receiver.apply(pickle.loads(now))
        clock.append(time.perf_counter())
        expanded = receiver.state()  # only when the main process is asked for state_dict() (a checkpoint)
        clock.append(time.perf_counter())
        assert expanded == json.loads(json.dumps(state)), "the state the main process rebuilt differs"
        if i < warmup:
            continue
        for key, (t0, t1) in zip(times, itertools.pairwise(clock)):
            times[key].append(t1 - t0)
        # What else the pack sends down the pipe (its tensors go by shared memory, as in a DataLoader).
        rest = replace(pack, pixel_values=torch.empty(0, dtype=torch.uint8), loader_state=None)
        sizes["rest"].append(len(ForkingPickler.dumps(rest)))
        sizes["json"].append(len(json.dumps(state, separators=(",", ":"))))
        sizes["before"].append(len(before))
        sizes["now"].append(len(now))
        sizes["keys"].append(len(find_restore_keys(state)))
    mean = {k: round(statistics.mean(v)) for k, v in sizes.items()}
    return {
        "setting": name,
        "sources": source_count,
        "shuffle_buffer": cfg.shuffle_buffer,
        "pack": {"llm_budget": cfg.pack.llm_budget, "vit_budget": cfg.pack.vit_budget, "buffer": cfg.pack.buffer_size},
        "packs": packs,
        "restore_keys_in_state": mean["keys"],
        "state_json_bytes": mean["json"],
        "bytes_per_pack_before": mean["before"],
        "bytes_per_pack_now": mean["now"],
        "bytes_per_pack_now_max": max(sizes["now"]),
        "reduction": round(mean["before"] / mean["now"], 1),
        "pack_bytes_besides_state": mean["rest"],
        "median_ms_per_pack": {
            "worker_state_dict": ms(times["state"]),
            "worker_send_before": ms(times["worker_before"]),
            "main_receive_before": ms(times["main_before"]),
            "worker_send_now": ms(times["worker_now"]),
            "main_receive_now": ms(times["main_now"]),
        },
        "median_ms_per_state_dict_call_now": ms(times["expand"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packs", type=int, default=60, help="packs measured per setting")
    parser.add_argument("--warmup", type=int, default=5, help="packs made first, while the buffers fill")
    parser.add_argument("--settings", default="default,large", help="comma-separated: default, large")
    parser.add_argument("--cache-dir", default="", help="where the synthetic shards are made (once)")
    args = parser.parse_args(argv)
    settings = {"default": (default_config, 2), "large": (large_config, 4)}
    load = os.getloadavg()[0]
    results = []
    for name in args.settings.split(","):
        make, count = settings[name]
        results.append(measure(name, make(args.cache_dir), count, args.packs, args.warmup))
    out = {"benchmark": "loader_state_per_pack", "cpus": os.cpu_count(), "load_before": round(load, 2)}
    out.update(load_after=round(os.getloadavg()[0], 2), results=results)
    print(dumps(out, indent=2))


if __name__ == "__main__":
    main()
