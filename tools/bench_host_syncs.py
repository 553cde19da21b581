"""Host synchronisations per training step: how often the step reads a tensor's value on the host and calls a
collective, counted with torch.profiler on the CPU (where nothing waits, so the count, not the time, is the figure).

On a GPU each read (`.item()`, `.tolist()`, `float(t)`, a device-to-host copy) waits for every kernel queued before
it, and each collective is a round trip between ranks: the step's kernels stop overlapping with the host's work.
This runs a short default run (tiny model, built-in data, one process) under the profiler, counts
`aten::_local_scalar_dense` (what every such read calls) per step with the code line that asked, and counts calls of
the trainer's collectives (vlm_train.train.distributed). Reads of tensors that stay on the host in a GPU run too
(HOST_SIDE) are counted apart from those that would wait for the device. Prints JSON.

    python tools/bench_host_syncs.py
    python tools/bench_host_syncs.py --steps 20 --micro-batches 4
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from vlm_train.jsonio import dumps
from vlm_train.train import distributed as D
from vlm_train.train.config import compose_config

COLLECTIVES = ("all_reduce", "all_gather_object", "broadcast_object", "barrier")


READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")  # Tensor methods that read values on the host
# On the CPU every tensor is on the host; on a GPU only some are. These functions read tensors that stay on the host
# in a GPU run too (the loader's packs, torch AdamW's step counters), so their reads never wait for the device.
HOST_SIDE = ("pack_totals", "token_coefficients", "pack_stats", "from_tensor", "step")


def _count_reads(into: collections.Counter, inside: list[bool]) -> None:
    """Wrap the Tensor methods that read values, counting calls made in a step by the line of ours that made them."""
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *a: Any, _original: Any = original, _name: str = name, **k: Any) -> Any:
            if inside[0]:
                ours = [f for f in traceback.extract_stack()[:-1] if "vlm_train/" in f.filename]
                frame = ours[-1] if ours else None
                where = f"{frame.filename.split('vlm_train/')[-1]}:{frame.lineno} {frame.name}" if frame else "?"
                side = "host" if any(f.name in HOST_SIDE for f in ours) else "device"
                into[f"{side} {where} .{_name.strip('_')}"] += 1
            return _original(self, *a, **k)

        setattr(torch.Tensor, name, read)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps of the profiled stage")
    parser.add_argument("--micro-batches", type=int, default=2, help="packs per step")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLM_TRAIN_CACHE", str(Path(tempfile.gettempdir()) / "vlm_train_bench_cache"))
    run_dir = tempfile.mkdtemp(prefix="host_syncs_")
    overrides = [
        f"run.dir={run_dir}",
        "curriculum.stages.0.steps=1",
        f"curriculum.stages.1.steps={args.steps}",
        f"train.micro_batches={args.micro_batches}",
        "eval.enabled=false",
        "data.num_workers=0",
        "data.synthetic.num_train_images=200",
        "data.synthetic.num_heldout_images=20",
        "logger.console_interval=1000",
    ]
    cfg = compose_config(*overrides)

    from vlm_train.train import trainer as T

    calls: collections.Counter = collections.Counter()
    reads: collections.Counter = collections.Counter()  # by the line that read, from the wrapped Tensor methods
    scalar_reads = [0]  # aten::_local_scalar_dense, as the profiler counts them
    inside = [False]  # in a training step: setup, saving and evaluation are not counted

    def counting(name: str) -> Any:
        original = getattr(D, name)

        def counted(*a: Any, **k: Any) -> Any:
            calls[name] += inside[0]
            return original(*a, **k)

        return counted

    for name in COLLECTIVES:  # the trainer calls them through the module, so wrapping the module's names counts all
        setattr(D, name, counting(name))
    step = T.Trainer._step

    def profiled_step(self: Any, stage: Any) -> Any:
        inside[0] = True
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=False) as prof:
                result = step(self, stage)
            scalar_reads[0] += sum(e.name == "aten::_local_scalar_dense" for e in prof.events())
            return result
        finally:
            inside[0] = False

    T.Trainer._step = profiled_step
    _count_reads(reads, inside)
    steps = T.run(cfg)["steps"]
    device = {k[len("device ") :]: v for k, v in reads.items() if k.startswith("device ")}
    result = {
        "steps": steps,
        "micro_batches": args.micro_batches,
        "profiler_scalar_reads_per_step": round(scalar_reads[0] / steps, 2),
        "tensor_reads_per_step": round(sum(reads.values()) / steps, 2),
        "collective_calls_per_step": {k: round(v / steps, 2) for k, v in sorted(calls.items())},
        "device_reads_per_step": round(sum(device.values()) / steps, 2),
        "device_reads_by_line_per_step": {k: round(v / steps, 2) for k, v in sorted(device.items())},
        "host_side_reads_per_step": round((sum(reads.values()) - sum(device.values())) / steps, 2),
    }
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
