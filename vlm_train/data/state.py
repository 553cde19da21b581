"""JSON-able randomness and sample identity: stable seeds from names, generator states, restore keys."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

RESTORE_FIELDS = ("source", "epoch", "url", "index", "offset", "key")
PART = "part"  # in a restore key: which part of a document split to fit the pack budgets


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts; unlike hash(), the same in every process and Python version."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def new_rng(*parts: Any) -> np.random.Generator:
    """A PCG64 generator seeded from `parts` (its state is small and JSON-able)."""
    return np.random.Generator(np.random.PCG64(stable_seed(*parts)))


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's state with its 128-bit integers as strings, so any JSON reader keeps them exact."""
    state = rng.bit_generator.state
    inner = {k: str(v) for k, v in state["state"].items()}
    return {
        "bit_generator": state["bit_generator"],
        "state": inner,
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    """Rebuild a generator saved by `rng_state`."""
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"loader state: unsupported random generator {state.get('bit_generator')!r}")
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {k: int(v) for k, v in state["state"].items()},
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }
    return rng


def restore_key(source: str, epoch: int, raw: dict[str, Any]) -> dict[str, Any]:
    """Where a raw sample lives: enough to read it again (by byte offset, or by index in its shard)."""
    return {
        "source": source,
        "epoch": epoch,
        "url": raw["__url__"],
        "index": raw["__index__"],
        "offset": raw.get("__offset__"),
        "key": raw["__key__"],
    }


def is_restore_key(value: Any) -> bool:
    """A restore key: exactly its fields, and `part` for one part of a document split into several samples."""
    return isinstance(value, dict) and set(value) - {PART} == set(RESTORE_FIELDS)


def find_restore_keys(tree: Any) -> list[dict[str, Any]]:
    """Every restore key inside a JSON-able tree (e.g. a packer state whose layout we need not know)."""
    if is_restore_key(tree):
        return [tree]
    if isinstance(tree, dict):
        return [k for v in tree.values() for k in find_restore_keys(v)]
    if isinstance(tree, (list, tuple)):
        return [k for v in tree for k in find_restore_keys(v)]
    return []


def sample_rng(seed: int, key: dict[str, Any]) -> np.random.Generator:
    """Per-sample randomness (resolution, token drop) from the seed and the sample's place in the epoch.

    Drawn from the restore key rather than a running generator, so re-encoding a sample on restore gives
    exactly the same patches, and each epoch sees the sample differently.
    """
    return new_rng(seed, "sample", key["source"], key["epoch"], key["url"], key["index"])
