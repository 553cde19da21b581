"""Where a training step of the default run spends its time, part by part, and how two versions of the model code
compare on the same packs. Prints JSON.

    python tools/profile_step.py                                  # the default run (data=synthetic)
    python tools/profile_step.py --data synthetic_video           # data=synthetic_video (curriculum=video)
    python tools/profile_step.py --compare-with /tmp/old          # A/B step time against another checkout's code

Profile: a short run of the real trainer (the preset's full stage, eval off, engine.threads as the run sets it),
every other step of it under torch.profiler (CPU). Each op's self time goes to the innermost named part around it
(scopes this tool opens around the model's functions and the trainer's: loader, ViT patch embedding, blocks,
rotary, merger, LLM, loss, optimizer, logging). A backward op goes to `backward:<part>` of the forward op that made
its autograd node (matched by the autograd sequence number), so the backward splits as the forward does. Python
time between ops stays with the scope it ran in. The unprofiled steps' wall times are reported beside, so the
profiler's own overhead shows.

Compare (--compare-with ROOT): the model code of ROOT/vlm_train (e.g. `git worktree add /tmp/old 8757906`), loaded
under another package name, against this checkout's, both from the same weights, each step on the same real pack of
the preset's loader through the trainer's own step (forward_backward and finish_step of vlm_train.train.step with
a single engine). The two alternate step by step (A, B, B, A, ...), so a shared machine's load falls on both alike;
reported: median step times, the median of the per-pack ratios, and the largest loss difference (the same math
gives the same losses).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function

from vlm_train.jsonio import dumps
from vlm_train.train.config import compose_config

PREFIX = "part:"
BACKWARD = "backward"
OLD_PACKAGE = "vlm_train_old"
OUTLIER = 1.5

# (module, attribute path, part): functions wrapped in a named scope. Innermost scope wins, so `vit` holds what the
# tower does outside its named pieces, `vit.block` what a block does outside attention, MLP and norms, and so on.
MODEL_SCOPES: tuple[tuple[str, str, str], ...] = (
    ("model.vlm", "VLM.embed", "llm.embed_scatter"),
    ("model.vlm", "pack_keep", "vit.layout"),
    ("model.vit", "VisionTransformer.forward", "vit.other"),
    ("model.vit", "VisionTransformer.layout", "vit.layout"),
    ("model.vit", "vision_cos_sin_at", "vit.rotary_tables"),
    ("model.vit", "inv_frequencies", "vit.rotary_tables"),
    ("model.vit", "PatchEmbed.forward", "vit.patch_embed"),
    ("model.vit", "VisionBlock.forward", "vit.block_other"),
    ("model.vit", "VisionAttention.forward", "vit.attn_proj"),
    ("model.vit", "apply_rotary", "vit.rotary_apply"),
    ("model.vit", "varlen_attention", "vit.sdpa"),
    ("model.projector", "PatchMerger.forward", "merger"),
    ("model.llm", "DecoderLM.forward_capture", "llm.other"),
    ("model.llm", "DecoderLM.rotary", "llm.rotary_tables"),
    ("model.llm", "DecoderLayer.forward", "llm.layer_other"),
    ("model.llm", "Attention.forward", "llm.attn_proj"),
    ("model.llm", "apply_rotary", "llm.rotary_apply"),
    ("model.llm", "varlen_attention", "llm.sdpa"),
    ("model.norm", "RMSNorm.forward", "norm"),
    ("model.mlp", "SwiGLU.forward", "mlp"),
)
TRAIN_SCOPES: tuple[tuple[str, str, str], ...] = (
    ("train.stage_data", "RankData.next_packs", "loader_wait"),
    ("train.kinds.vlm", "forward_backward", "step_bookkeeping"),  # the names the callers imported
    ("train.trainer", "forward_backward", "step_bookkeeping"),  # (before stage kinds: the trainer's)
    ("train.loss", "token_cross_entropy", "loss"),
    ("train.loss", "weighted_loss", "loss"),
    ("train.loss", "sample_loss_sums", "loss_sums"),
    ("train.engines.single", "SingleEngine.backward", BACKWARD),
    ("train.trainer", "pack_stats", "logging"),
    ("train.trainer", "finish_step", "host_sync_allreduce"),
    ("train.engines.single", "SingleEngine.step", "optimizer"),
    ("train.trainer", "step_record", "logging"),
    ("train.metrics", "MetricsLogger.log", "logging"),
)
# Norms and MLPs are shared modules: their part is named after the tower they run in.
SHARED = ("norm", "mlp")

# The table's groups: each part (forward, or backward:<part>) adds into the first group whose prefix it starts with.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data loader wait", ("loader_wait",)),
    ("ViT patch embed (fwd)", ("vit.patch_embed",)),
    ("ViT blocks: qkv/proj + MLP + norms (fwd)", ("vit.attn_proj", "vit.mlp", "vit.norm", "vit.block_other")),
    ("ViT attention core (fwd)", ("vit.sdpa",)),
    ("ViT rotary apply (fwd)", ("vit.rotary_apply",)),
    ("ViT layout + rotary tables + rest (fwd)", ("vit.layout", "vit.rotary_tables", "vit.other")),
    ("merger (fwd)", ("merger",)),
    ("LLM embed + image scatter (fwd)", ("llm.embed_scatter",)),
    ("LLM layers: qkv/o + MLP + norms (fwd)", ("llm.attn_proj", "llm.mlp", "llm.norm", "llm.layer_other")),
    ("LLM attention core (fwd)", ("llm.sdpa",)),
    ("LLM rotary apply + tables (fwd)", ("llm.rotary_apply", "llm.rotary_tables")),
    ("LLM rest: final norm (fwd)", ("llm.other",)),
    ("loss (fwd, chunked head + CE)", ("loss",)),
    ("backward: ViT patch embed", ("backward:vit.patch_embed",)),
    ("backward: ViT rest", ("backward:vit",)),
    ("backward: merger", ("backward:merger",)),
    ("backward: LLM", ("backward:llm",)),
    ("backward: loss (head recomputed)", ("backward:loss",)),
    ("backward: engine/unattributed", ("backward",)),
    ("optimizer (clip + AdamW)", ("optimizer",)),
    ("all-reduce + read of step sums (host sync)", ("host_sync_allreduce",)),
    ("step bookkeeping (coefficients, pack.to, sums)", ("step_bookkeeping", "loss_sums")),
    ("logging (pack_stats, record, metrics)", ("logging", "trainer")),
)


# ---------------------------------------------------------------- scopes


def _wrap(function: Callable, part: str) -> Callable:
    @functools.wraps(function)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + part):
            return function(*args, **kwargs)

    scoped.__wrapped_part__ = part  # type: ignore[attr-defined]
    return scoped


def install_scopes(package: str, scopes: tuple[tuple[str, str, str], ...]) -> list[str]:
    """Wrap each named function of `package` in its part's scope; returns the names that this code lacks."""
    missing = []
    for module_name, path, part in scopes:
        try:
            owner: Any = importlib.import_module(f"{package}.{module_name}")
        except ImportError:
            missing.append(f"{module_name}.{path}")
            continue
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        function = getattr(owner, attr, None)
        if function is None:
            missing.append(f"{module_name}.{path}")
            continue
        if hasattr(function, "__wrapped_part__"):
            continue
        setattr(owner, attr, _wrap(function, part))
    return missing


def _scope_of(event: Any) -> str | None:
    """The innermost part scope around `event` (itself included); a shared module (norm, MLP) takes the name of
    the tower it runs in (`vit.norm`), or of the part around it (the merger's norm is the merger's)."""
    inner, node = None, event
    while node is not None:
        if node.name.startswith(PREFIX):
            part = node.name[len(PREFIX) :]
            if part not in SHARED:
                if inner is None:
                    return part
                return f"{part.split('.')[0]}.{inner}" if part.startswith(("vit.", "llm.")) else part
            inner = inner or part
        node = node.cpu_parent
    return inner


def attribute(events: list[Any]) -> dict[str, float]:
    """Self CPU time (µs) per part: forward ops by their scope, backward ops by the forward op of their node."""
    # Every op records the sequence number the next autograd node will take, and the op that makes that node is
    # the last to record it: so the last forward op with a number names the node's part.
    forward_part: dict[int, str] = {}
    for event in sorted(events, key=lambda e: e.time_range.start):
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            part = _scope_of(event)
            if part is not None and not part.startswith(BACKWARD):
                forward_part[event.sequence_nr] = part
    times: collections.Counter = collections.Counter()
    for event in events:
        part = _scope_of(event) or "trainer"
        if part == BACKWARD:
            node = event
            while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
                node = node.cpu_parent
            if node is not None and node.sequence_nr in forward_part:
                part = f"{BACKWARD}:{forward_part[node.sequence_nr]}"
        times[part] += event.self_cpu_time_total
    return dict(times)


def group_table(per_part_us: dict[str, float], steps: int) -> dict[str, dict[str, float]]:
    """ms per step and share of the step per group of GROUPS."""
    grouped: collections.Counter = collections.Counter()
    for part, us in per_part_us.items():
        for name, prefixes in GROUPS:
            if any(part == p or part.startswith(p + ".") or part.startswith(p + ":") for p in prefixes):
                grouped[name] += us
                break
        else:
            grouped[f"other: {part}"] += us
    total = sum(grouped.values())
    return {
        name: {"ms_per_step": round(grouped[name] / 1000 / steps, 3), "share": round(grouped[name] / total, 4)}
        for name in [g for g, _ in GROUPS] + sorted(k for k in grouped if k.startswith("other: "))
        if grouped[name]
    }


# ---------------------------------------------------------------- profile


def _overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    data = [f"data={args.data}"] if args.data != "synthetic" else []
    return [
        *data,
        f"run.dir={run_dir}",
        "curriculum.stages.0.steps=1",
        f"curriculum.stages.1.steps={args.warmup + 2 * args.steps}",
        "eval.enabled=false",
        "logger.console_interval=100000",
        *args.override,
    ]


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """The real trainer's steps, every other one profiled after the warm-up."""
    cfg = compose_config(*_overrides(args, tempfile.mkdtemp(prefix="profile_step_")))
    missing = install_scopes("vlm_train", MODEL_SCOPES + TRAIN_SCOPES)
    from vlm_train.train import trainer as T

    step = T.Trainer._step
    per_step: list[dict[str, float]] = []  # each profiled step's parts
    profiled_s: list[float] = []
    plain_s: list[float] = []
    count = [0]

    def timed_step(self: Any, stage: Any) -> Any:
        count[0] += 1
        full = self.position.stage == len(self.cfg.curriculum.stages) - 1
        index = count[0] - 2 - args.warmup  # the first step is the one-step align stage
        started = time.perf_counter()
        if not full or index < 0 or index % 2:
            result = step(self, stage)
            if full and index >= 0:
                plain_s.append(time.perf_counter() - started)
            return result
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof, record_function(PREFIX + "trainer"):
            result = step(self, stage)
        profiled_s.append(time.perf_counter() - started)
        per_step.append(attribute(list(prof.events())))
        return result

    T.Trainer._step = timed_step
    load_before = list(os.getloadavg())
    T.run(cfg)
    # A shared machine's load spikes make a few steps many times slower (most with 2 threads fighting other
    # processes): steps over OUTLIER x the median profiled step are left out of the table, and counted.
    limit = OUTLIER * statistics.median(profiled_s)
    kept = [parts for parts, seconds in zip(per_step, profiled_s) if seconds <= limit]
    per_part: collections.Counter = collections.Counter()
    for parts in kept:
        per_part.update(parts)
    steps = len(kept)
    table = group_table(dict(per_part), steps)
    return {
        "data": args.data,
        "threads": torch.get_num_threads(),
        "engine_threads": cfg.engine.threads,
        "micro_batches": cfg.train.micro_batches,
        "profiled_steps": len(profiled_s),
        "outlier_steps_left_out": len(profiled_s) - steps,
        "median_step_s_unprofiled": statistics.median(plain_s),
        "median_step_s_profiled": statistics.median(profiled_s),
        "table": table,
        "parts_ms_per_step": {k: round(v / 1000 / steps, 3) for k, v in per_part.most_common()},
        "scopes_missing_in_this_code": missing,
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
    }


# ---------------------------------------------------------------- compare


@contextlib.contextmanager
def _old_package(root: Path) -> Iterator[Any]:
    """ROOT/vlm_train importable as OLD_PACKAGE (its model code imports within the package by relative imports)."""
    source = root / "vlm_train"
    if not (source / "model" / "vlm.py").is_file():
        raise SystemExit(f"--compare-with {root}: no vlm_train/model/vlm.py there (give a checkout's root folder)")
    folder = Path(tempfile.mkdtemp(prefix="profile_step_old_"))
    (folder / OLD_PACKAGE).symlink_to(source.resolve(), target_is_directory=True)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(f"{OLD_PACKAGE}.model.vlm")
    finally:
        sys.path.remove(str(folder))


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Old and new model code, alternating step by step on the same packs through the trainer's step."""
    from vlm_train.runtime import set_cpu_threads
    from vlm_train.train.builders import build_data, build_model
    from vlm_train.train.curriculum import param_groups, set_trainable, stage_loss
    from vlm_train.train.engines.single import SingleEngine
    from vlm_train.train.guards import FaultInjector, Guard
    from vlm_train.train.stage_data import RankData
    from vlm_train.train.step import LossGroups, finish_step, forward_backward

    cfg = compose_config(*_overrides(args, tempfile.mkdtemp(prefix="profile_step_")))
    set_cpu_threads(cfg.engine.threads)
    device = torch.device("cpu")
    stage = cfg.curriculum.stages[-1]
    setup = build_data(cfg.data, cfg.model)
    data = RankData(setup, cfg.data, cfg.model, cfg.run.seed, 0, 1, FaultInjector(cfg.train.fault, 0))
    data.enter(stage, setup.flops_cost)  # packs balanced as a vlm stage's are
    packs = [data.next_packs(cfg.train.micro_batches) for _ in range(args.warmup + args.steps)]
    data.close()
    policy = stage_loss(cfg.loss, stage)
    groups = LossGroups(tuple(s.name for s in setup.sources))

    torch.manual_seed(cfg.run.seed)
    new_model = build_model(cfg.model, setup, load_hf=False)
    with _old_package(Path(args.compare_with)) as old_vlm:
        # A dict: the old package has its own config classes.
        old_cfg = dataclasses.asdict(new_model.cfg)
        old_model = old_vlm.VLM(old_cfg, new_model.llm.cfg.vocab_size, new_model.image_token_id)
        old_model.load_state_dict(new_model.state_dict())

        def engine_of(model: Any) -> SingleEngine:
            engine = SingleEngine(model, cfg.train, device, bf16=False)

            def make_groups(module: torch.nn.Module) -> list[dict]:
                set_trainable(module, list(stage.trainable))
                return param_groups(module, stage, cfg.curriculum.groups, cfg.train)

            engine.start_stage(make_groups, 0)
            engine.set_lrs({group["name"]: args.lr for group in engine.param_groups()})
            return engine

        engines = {"old": engine_of(old_model), "new": engine_of(new_model)}
        guard = Guard(cfg.train.guard)
        times: dict[str, list[float]] = {"old": [], "new": []}
        losses: dict[str, list[float]] = {"old": [], "new": []}
        load_before = list(os.getloadavg())
        for index, step_packs in enumerate(packs):
            order = ("old", "new") if index % 2 == 0 else ("new", "old")
            for name in order:
                started = time.perf_counter()
                result = forward_backward(engines[name], step_packs, policy, groups=groups)
                finish_step(engines[name], result, guard, False)
                if index >= args.warmup:
                    times[name].append(time.perf_counter() - started)
                losses[name].append(result.loss)
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    return {
        "data": args.data,
        "compare_with": str(args.compare_with),
        "threads": torch.get_num_threads(),
        "micro_batches": cfg.train.micro_batches,
        "timed_steps": len(ratios),
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "total_s": {k: sum(v) for k, v in times.items()},
        "median_new_over_old": statistics.median(ratios),
        "quartiles_new_over_old": statistics.quantiles(ratios, n=4),
        "total_new_over_old": sum(times["new"]) / sum(times["old"]),
        "max_loss_abs_diff": max(abs(a - b) for a, b in zip(losses["old"], losses["new"])),
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="data preset (conf/data): synthetic | synthetic_video")
    parser.add_argument("--steps", type=int, default=20, help="profiled (or, comparing, timed) steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--compare-with", default="", help="a checkout's root: A/B its model code against this one")
    parser.add_argument("--lr", type=float, default=1e-3, help="comparing: the learning rate of every group")
    parser.add_argument("override", nargs="*", help="more Hydra overrides (e.g. engine.threads=1)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.warmup < 0:
        parser.error("--steps must be positive and --warmup >= 0")
    os.environ.setdefault("VLM_TRAIN_CACHE", str(Path(tempfile.gettempdir()) / "vlm_train_bench_cache"))
    result = compare(args) if args.compare_with else profile(args)
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
