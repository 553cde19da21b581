"""Everything a person with one GPU needs to know about the GPU path, in one run that prints one JSON object.

    python tools/gpu_check.py --out gpu_check                  # one GPU: under 8 minutes on an H200
    python tools/gpu_check.py --device cpu --tiny --out /tmp/c # the same checks, tiny shapes, on the CPU (tests)
    python tools/gpu_check.py --device cpu --tiny --bf16       # ... with bf16 as on a GPU (slow on a CPU: a test)

It runs, in this order:
1. `tests`: the CUDA tests (every attention backend against the sdpa reference, forward and backward, bf16 and
   fp16, odd segment lengths and GQA; the whole VLM across backends; liger's fused loss against ours), by pytest.
2. `train`: a Qwen2.5-VL-3B-shaped model, randomly initialised, trained on synthetic image-text packs of 8192 LLM
   tokens with bf16 autocast, with the trainer's own step (forward_backward, pack_stats, finish_step) for each
   attention backend that can run, activation checkpointing off and on: tokens/s, TFLOP/s and MFU by the trainer's
   own FLOPs count (ViT included), peak memory. With `--tiny`: the tiny preset, packs of 1024 tokens.
3. `fused_loss`: liger-kernel's fused linear + cross-entropy against the chunked loss (losses, gradients, time),
   where liger-kernel is installed and a GPU is there.
4. `profile`: a torch.profiler table of the top kernels of one step, written to OUT/profile.txt.
5. `deepspeed`: `vlm-train engine=deepspeed engine.zero_stage=2` under torchrun on one device, whole and stopped
   then resumed: the largest difference between the two runs' losses.
6. `fsdp2`: the same with `engine=fsdp2` (built on the meta device, sharded checkpoints), with its step time.

Set-up on a machine without the package's dependencies (the lent GPU machine): see tools/gpu_setup.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm_train.data.collate import collate
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.packer import PackConfig, Packer
from vlm_train.jsonio import dumps
from vlm_train.model import VLM, ModelConfig, pack_flops
from vlm_train.model.attention import backend_problem
from vlm_train.model.fused_loss import liger_problem
from vlm_train.train import loss as L
from vlm_train.train.config import EngineConfig, GuardConfig, LossConfig, StageConfig, TrainConfig
from vlm_train.train.curriculum import param_groups, set_trainable
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engines import build_engine, use_bf16
from vlm_train.train.guards import Guard
from vlm_train.train.step import finish_step, forward_backward, pack_stats
from vlm_train.train.throughput import device_peak_flops, memory_gb

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("sdpa", "torch_varlen", "flash_attn")
WORDS = "a red green blue small large ring cross square triangle left right of the on near with and".split()


# ---- set-up ---------------------------------------------------------------------------------------------------


def compose_model(preset: str) -> ModelConfig:
    """A model preset of conf/model as Hydra composes it."""
    from vlm_train.train.config import compose_config

    return compose_config(f"model={preset}").model


def tiny_encoder(model: ModelConfig, max_pixels: int) -> Encoder:
    from vlm_train.data.image import PatchSpec
    from vlm_train.data.synthetic import corpus_lines
    from vlm_train.data.tokenizer import load_tokenizer

    v = model.vision
    spec = PatchSpec(v.patch_size, v.temporal_patch_size, v.spatial_merge_size, 56 * 56, max_pixels)
    return Encoder(load_tokenizer("tiny", corpus=corpus_lines()), spec)


def synthetic_packs(encoder: Encoder, llm_budget: int, vit_budget: int, count: int, max_side: int, seed: int = 0):
    """`count` packs of random image-text samples: noise images of random sizes and captions of random words, about
    the mix of a caption / conversation pretraining set (one image, 20-400 words), packed by our own packer."""
    rng = np.random.default_rng(seed)
    packer = Packer(PackConfig(llm_budget=llm_budget, vit_budget=vit_budget, buffer_size=16), encoder.special)
    packs, index = [], 0
    while len(packs) < count:
        width, height = (int(rng.integers(56, max_side + 1)) for _ in range(2))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        words = " ".join(rng.choice(WORDS, int(rng.integers(20, 400))))
        turns = [Turn("user", IMAGE_PLACEHOLDER + "Describe the image."), Turn("assistant", words)]
        encoded = encoder.encode(Sample(f"s{index}", "synthetic", "caption", [image], turns))
        index += 1
        with contextlib.suppress(Exception):  # a sample over the budgets is dropped, as in training
            packs += [collate(p, image_token_id=encoder.special.image_pad) for p in packer.add(encoded)]
    return packs[:count]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. the CUDA tests ------------------------------------------------------------------------------------------


def run_tests(out: Path, timeout: int) -> dict[str, Any]:
    """The CUDA tests by pytest (on a CPU they skip, which the counts show)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"]
    command += ["tests/test_attention.py", "tests/test_chunked_loss.py", "-k", "cuda or gpu or liger"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", result.stdout)}
    (out / "tests.log").write_text(result.stdout + result.stderr)
    failed = re.findall(r"FAILED (\S+)", result.stdout)
    return {
        "counts": counts,
        "failed": failed,
        "returncode": result.returncode,
        "seconds": time.perf_counter() - started,
    }


# ---- 2. training throughput ------------------------------------------------------------------------------------


def _engine(model: VLM, device: torch.device, bf16: str):
    train = TrainConfig(micro_batches=1)
    engine = build_engine(EngineConfig(name="single", bf16=bf16), train, model, lambda: model, device, DistInfo())

    def groups(module: torch.nn.Module) -> list[dict]:
        set_trainable(module, ["*"])
        return param_groups(module, StageConfig(name="all", steps=1), {}, train)

    engine.start_stage(groups, 0)
    engine.set_lrs({g["name"]: 1e-5 for g in engine.param_groups()})
    return engine


def train_throughput(
    model: VLM,
    packs: list,
    device: torch.device,
    backend: str,
    checkpointing: bool,
    steps: int,
    warmup: int,
    bf16: str,
) -> dict[str, Any]:
    """`steps` timed optimizer steps (after `warmup`) of the trainer's own step on `packs`, one pack per step."""
    model.set_attn_backend(backend)
    model.vision.activation_checkpointing = model.llm.activation_checkpointing = checkpointing
    engine = _engine(model, device, bf16)
    policy, guard = LossConfig(), Guard(GuardConfig(max_consecutive_skips=0))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, flops, losses = [], 0, 0.0, []
    for i in range(warmup + steps):
        pack = packs[i % len(packs)]
        _sync(device)
        started = time.perf_counter()
        result = forward_backward(engine, [pack], policy)
        pack_stats(
            result, [pack], pack.num_tokens, max(pack.num_patches, 1), lambda p: pack_flops(model.cfg, p).training
        )
        result = finish_step(engine, result, guard, stop=False)
        _sync(device)
        losses.append(result.loss)
        if i >= warmup:
            times.append(time.perf_counter() - started)
            tokens += result.tokens
            flops += result.flops
    seconds = sum(times)
    peak = device_peak_flops(device, 0.0)
    memory = memory_gb(device)
    engine.close()
    return {
        "backend": backend,
        "activation_checkpointing": checkpointing,
        "steps": steps,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "step_s_median": float(np.median(times)),
        "peak_memory_gb": memory.get("memory/max_allocated_gb", memory.get("memory/max_rss_gb")),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


# ---- 3. the fused loss ------------------------------------------------------------------------------------------


def fused_loss(model: VLM, packs: list, device: torch.device, repeats: int = 5) -> dict[str, Any]:
    """liger's fused linear + cross-entropy against the chunked loss on one pack's final hidden states."""
    problem = liger_problem(device)
    if problem is not None:
        return {"available": False, "why": problem}
    pack = packs[0].to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        hidden = model(pack, return_logits=False).hidden
    head, runs = model.llm.lm_head, {}
    for kernel in ("chunked", "liger"):
        times = []
        for _ in range(repeats):
            h = hidden.detach().clone().requires_grad_(True)
            head.zero_grad(set_to_none=True)
            _sync(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                losses = L.token_cross_entropy(h, pack.labels, head, kernel=kernel)
            losses.sum().backward()
            _sync(device)
            times.append(time.perf_counter() - started)
        runs[kernel] = (1000 * float(np.median(times)), losses.detach().float(), h.grad.float())
    (chunked_ms, chunked_losses, chunked_grad), (liger_ms, liger_losses, liger_grad) = runs["chunked"], runs["liger"]
    return {
        "available": True,
        "chunked_ms": chunked_ms,
        "liger_ms": liger_ms,
        "losses_max_abs_diff": float((liger_losses - chunked_losses).abs().max()),
        "grad_max_abs_diff": float((liger_grad - chunked_grad).abs().max()),
    }


# ---- 4. the profiler ------------------------------------------------------------------------------------------


def profile_step(model: VLM, packs: list, device: torch.device, backend: str, out: Path, bf16: str) -> dict[str, Any]:
    """One training step under torch.profiler: the top kernels by device time (CPU time without a GPU)."""
    model.set_attn_backend(backend)
    model.vision.activation_checkpointing = model.llm.activation_checkpointing = False
    engine = _engine(model, device, bf16)
    policy, guard = LossConfig(), Guard(GuardConfig(max_consecutive_skips=0))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for pack in packs[:2]:  # warm-up, then the profiled step
        result = forward_backward(engine, [pack], policy)
        finish_step(engine, result, guard, stop=False)
    _sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        result = forward_backward(engine, [packs[2 % len(packs)]], policy)
        finish_step(engine, result, guard, stop=False)
        _sync(device)
    engine.close()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    (out / "profile.txt").write_text(averages.table(sort_by=key, row_limit=40))
    total = sum(getattr(e, key) for e in averages)
    rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:12]
    top = [
        {"name": e.key[:90], "ms": getattr(e, key) / 1000, "share": getattr(e, key) / total, "calls": e.count}
        for e in rows
    ]
    return {"file": str(out / "profile.txt"), "sorted_by": key, "step_ms": total / 1000, "top": top}


# ---- 5. DeepSpeed and exact resume -----------------------------------------------------------------------------


def deepspeed_resume(out: Path, device: str, timeout: int, bf16: str) -> dict[str, Any]:
    """vlm-train with DeepSpeed ZeRO-2 under torchrun on one device: 6 steps whole, and 3 + 3 across a resume."""
    return engine_resume(out, device, timeout, bf16, "deepspeed", ["engine=deepspeed", "engine.zero_stage=2"])


def engine_resume(out: Path, device: str, timeout: int, bf16: str, name: str, engine: list[str]) -> dict[str, Any]:
    """vlm-train with `engine` under torchrun on one device: 6 steps whole, and 3 + 3 across a resume."""
    common = [
        "data.synthetic.num_train_images=200",
        "data.synthetic.num_heldout_images=20",
        "data.synthetic.images_per_shard=50",
        "data.num_workers=0",
        "curriculum.stages.0.steps=2",
        "curriculum.stages.1.steps=4",
        *engine,
        f"engine.device={device}",
        f"engine.bf16={bf16}",
        "eval.enabled=false",
        "logger.console_interval=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    env.setdefault("VLM_TRAIN_CACHE", str(out / "cache"))

    def launch(run_dir: Path, *more: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        command += ["-m", "vlm_train.train"]
        result = subprocess.run(
            [*command, *common, f"run.dir={run_dir}", *more],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        (out / f"{name}_{run_dir.name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{run_dir.name}: exit {result.returncode}: {result.stderr[-1500:]}")
        return result

    def rows(run_dir: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    started = time.perf_counter()
    whole_dir, parts_dir = out / f"{name}_whole", out / f"{name}_parts"
    try:
        launch(whole_dir)
        launch(parts_dir, "train.exit_at_step=3")
        launch(parts_dir)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "error": str(exc)[-2000:], "seconds": time.perf_counter() - started}
    whole = {r["step"]: r["loss"] for r in rows(whole_dir)}
    parts = {r["step"]: r["loss"] for r in rows(parts_dir)}
    diffs = [abs(whole[s] - parts[s]) for s in whole if whole[s] is not None and parts.get(s) is not None]
    last = rows(whole_dir)[-1]
    return {
        "ok": sorted(whole) == sorted(parts) == list(range(1, 7)),
        "steps": len(whole),
        "losses": [whole[s] for s in sorted(whole)],
        "resume_max_abs_loss_diff": max(diffs) if diffs else None,
        "last_step_time_s": last.get("step_time_s"),
        "last_tokens_per_s": last.get("tokens_per_s"),
        "seconds": time.perf_counter() - started,
    }


# ---- the run ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset and packs of 1024 tokens")
    parser.add_argument("--out", default=None, help="folder for the profile table, logs and runs (default: a temp)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 30, tiny 3)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "train", "fused_loss", "profile", "deepspeed", "fsdp2"]
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds for each subprocess (tests, each launch)")
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 on the CPU too (engine.bf16=true; on a GPU it is on anyway)"
    )
    args = parser.parse_args(argv)
    bf16 = "true" if args.bf16 else "auto"

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU here: use --device cpu --tiny")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    preset = "tiny" if args.tiny else "qwen2_5_vl_3b"
    llm_budget, vit_budget, max_side = (1024, 4096, 112) if args.tiny else (8192, 32768, 672)
    steps, warmup = (args.steps or (3 if args.tiny else 30)), (1 if args.tiny else 3)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": preset,
        "llm_budget": llm_budget,
        "vit_budget": vit_budget,
        "peak_tflops": (device_peak_flops(device, 0.0) or 0) / 1e12 or None,
        "bf16": use_bf16(EngineConfig(bf16=bf16), device),
    }
    if "tests" not in args.skip:
        report["tests"] = run_tests(out, args.timeout)

    model_cfg = compose_model(preset)
    model_cfg.attn_backend = "sdpa"
    encoder = tiny_encoder(model_cfg, max_pixels=max_side * max_side)
    packs = synthetic_packs(encoder, llm_budget, vit_budget, count=8, max_side=max_side)
    report["packs"] = {
        "count": len(packs),
        "tokens_mean": float(np.mean([p.num_tokens for p in packs])),
        "patches_mean": float(np.mean([p.num_patches for p in packs])),
        "samples_mean": float(np.mean([p.num_samples for p in packs])),
    }
    vocab = model_cfg.llm.vocab_size or len(encoder.tokenizer)
    with torch.device(device):  # weights made on the device: a 3B model initialises in seconds there
        model = VLM(model_cfg, vocab_size=vocab, image_token_id=encoder.special.image_pad)
    report["parameters"] = model.num_parameters()
    backends = [
        b for b in BACKENDS if backend_problem(b, device, torch.bfloat16 if device.type == "cuda" else None) is None
    ]
    report["backends_unavailable"] = {
        b: backend_problem(b, device, torch.bfloat16) for b in BACKENDS if b not in backends
    }
    if "train" not in args.skip:
        report["train"] = []
        for backend in backends:
            for checkpointing in (False, True):
                try:
                    row = train_throughput(model, packs, device, backend, checkpointing, steps, warmup, bf16)
                except torch.OutOfMemoryError as exc:
                    row = {"backend": backend, "activation_checkpointing": checkpointing, "error": str(exc)[:300]}
                report["train"].append(row)
    if "fused_loss" not in args.skip:
        report["fused_loss"] = fused_loss(model, packs, device)
    if "profile" not in args.skip:
        report["profile"] = profile_step(model, packs, device, backends[-1], out, bf16)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "deepspeed" not in args.skip:
        report["deepspeed"] = deepspeed_resume(out, args.device, args.timeout, bf16)
    if "fsdp2" not in args.skip:
        report["fsdp2"] = engine_resume(out, args.device, args.timeout, bf16, "fsdp2", ["engine=fsdp2"])
    report["out"] = str(out)
    report["seconds"] = time.perf_counter() - started
    text = dumps(report, indent=2)
    (out / "gpu_check.json").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
