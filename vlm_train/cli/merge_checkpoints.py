"""Average the weights of several checkpoints of one model (model soup): a new checkpoint folder of ours.

    vlm-merge-checkpoints --out soups/uniform run_a run_b run_c
    vlm-merge-checkpoints --out soups/late run/checkpoints/step_00000600 \\
        run/checkpoints/step_00000800 --weights 1 3          # normalised: 0.25, 0.75
    vlm-merge-checkpoints --out soups/diff a b --weights 1 -1 --no-normalize   # task vector a - b

Each input is a checkpoints/step_XXXXXXXX folder or a run folder (its newest complete checkpoint). They must
share the model config (runtime switches such as the attention backend aside), tokenizer, tensor names, shapes
and dtypes. Tensors are averaged in float64 and stored in their own dtype (or --dtype). The output holds
model.safetensors, the first input's config.yaml and tokenizer/, and merge.json saying what went in; it has no
optimizer state, so it serves generation, evaluation, export and initialisation, not resumption. Prints JSON.
"""

from __future__ import annotations

import argparse
import filecmp
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_train.devices import DTYPES
from vlm_train.inference import read_config
from vlm_train.jsonio import dumps
from vlm_train.train.checkpoint import publish, resolve_checkpoint

# Model settings that change how a model runs, not what its weights mean.
RUNTIME_KEYS = (
    "attn_backend",
    "activation_checkpointing",
    "compile",
    "init_from_hf",
    "init_llm_from_hf",
    "init_vision_from_hf",
    "init_vision_from",
)


class CheckpointMismatch(ValueError):
    """The checkpoints are not of one model: the message names the first difference."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def model_config(checkpoint: Path) -> dict[str, Any]:
    """The model section of a checkpoint's config.yaml without its runtime switches, flattened."""
    model = read_config(checkpoint).get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{checkpoint / 'config.yaml'} has no model section")
    return {k: v for k, v in _flatten(model).items() if k not in RUNTIME_KEYS}


def check_same_model(checkpoints: list[Path]) -> None:
    """Raise CheckpointMismatch naming the first config, tokenizer, tensor name, shape or dtype that differs."""
    first = checkpoints[0]
    reference = model_config(first)
    for other in checkpoints[1:]:
        theirs = model_config(other)
        diff = sorted(k for k in set(reference) | set(theirs) if reference.get(k) != theirs.get(k))
        if diff:
            details = ", ".join(f"model.{k}: {reference.get(k)!r} vs {theirs.get(k)!r}" for k in diff[:5])
            raise CheckpointMismatch(f"{other} has another model config than {first}: {details}")
        _check_same_tokenizer(first, other)
    with safe_open(str(first / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in names}
    for other in checkpoints[1:]:
        with safe_open(str(other / "model.safetensors"), "pt") as f:
            theirs = set(f.keys())
            if theirs != names:
                missing, extra = sorted(names - theirs), sorted(theirs - names)
                raise CheckpointMismatch(
                    f"{other} has other tensors than {first}: missing {missing[:5]}, extra {extra[:5]}"
                )
            for name in sorted(names):
                found = (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                if found != shapes[name]:
                    raise CheckpointMismatch(
                        f"tensor {name}: {first} has shape/dtype {shapes[name]}, {other} has {found}"
                    )


def _check_same_tokenizer(first: Path, other: Path) -> None:
    a, b = first / "tokenizer", other / "tokenizer"
    if a.is_dir() != b.is_dir():
        raise CheckpointMismatch(f"{first if a.is_dir() else other} has a tokenizer/ folder and the other does not")
    if a.is_dir():
        files = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
        _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
        if mismatch or errors:
            raise CheckpointMismatch(f"tokenizers differ between {first} and {other}: {sorted(mismatch + errors)}")


def resolve_weights(count: int, weights: list[float] | None, normalize: bool) -> list[float]:
    """Uniform by default; explicit weights are scaled to sum to 1 unless normalize is off."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} checkpoints: give one weight per checkpoint")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if not normalize:
        return list(weights)
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"normalised weights must be >= 0 and not all 0, got {weights} (see --no-normalize)")
    total = sum(weights)
    return [w / total for w in weights]


def merge_state(checkpoints: list[Path], weights: list[float], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """sum_i w_i * tensor_i for every tensor, accumulated in float64, one tensor name at a time."""
    merged = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(c / "model.safetensors"), "pt")) for c in checkpoints]
        for name in handles[0].keys():
            total, stored = None, None
            for weight, f in zip(weights, handles):
                tensor = f.get_tensor(name)
                if not tensor.is_floating_point():  # counters or indices: equal everywhere, else not one model
                    merged.setdefault(name, tensor)
                    if not torch.equal(merged[name], tensor):
                        raise CheckpointMismatch(f"integer tensor {name} differs between the checkpoints")
                    continue
                stored = stored or tensor.dtype
                term = tensor.to(torch.float64) * weight
                total = term if total is None else total.add_(term)
            if total is not None:
                merged[name] = total.to(dtype or stored)
    return merged


def merge(
    inputs: list[str],
    out: str,
    weights: list[float] | None = None,
    normalize: bool = True,
    dtype: str = "auto",
    force: bool = False,
) -> dict[str, Any]:
    """Write the weighted average of `inputs` to the checkpoint folder `out`; returns a summary."""
    if len(inputs) < 2:
        raise ValueError(f"give at least two checkpoints to merge, got {len(inputs)}")
    checkpoints = [resolve_checkpoint(p) for p in inputs]
    if len({c.resolve() for c in checkpoints}) != len(checkpoints):
        raise ValueError(f"a checkpoint is given twice: {[str(c) for c in checkpoints]} (use --weights instead)")
    check_same_model(checkpoints)
    resolved = resolve_weights(len(checkpoints), weights, normalize)
    target = Path(out).expanduser()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists: choose another --out or pass --force to replace it")
    state = merge_state(checkpoints, resolved, None if dtype == "auto" else DTYPES[dtype])
    with safe_open(str(checkpoints[0] / "model.safetensors"), "pt") as f:
        metadata = f.metadata() or {"format": "pt"}

    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
    shutil.copy2(checkpoints[0] / "config.yaml", tmp / "config.yaml")
    if (checkpoints[0] / "tokenizer").is_dir():
        shutil.copytree(checkpoints[0] / "tokenizer", tmp / "tokenizer")
    summary = {
        "output": str(target),
        "checkpoints": [str(c) for c in checkpoints],
        "weights": resolved,
        "normalized": normalize or weights is None,
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
    }
    (tmp / "merge.json").write_text(dumps(summary, indent=2))
    publish(tmp, target)  # visible only once complete, like the trainer's checkpoints
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint or run folders (two or more)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one per checkpoint (default: equal)")
    parser.add_argument("--no-normalize", action="store_true", help="use --weights as given, not scaled to sum 1")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="stored dtype (auto: as input)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    summary = merge(args.checkpoints, args.out, args.weights, not args.no_normalize, args.dtype, args.force)
    print(dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
