"""Samples of a target's stored hidden states (format `hidden_states`, written by tools/dump_hidden_states.py for
offline Eagle3 draft training): already encoded, so they skip decoding and the encoder and go straight to the packer.

One webdataset sample per training sample, members:
  input_ids.npy       int32 [n]     the token ids, as the online loader encodes the sample
  labels.npy          int32 [n]     shifted within the sample, -100 where no loss
  position_ids.npy    int32 [3, n]  M-RoPE positions
  hidden.safetensors  `aux` [n, 3D] (the draft's three target layers, concatenated) and `final` [n, D] (the
                      final-normed state the LM head reads), bfloat16 or float16 (numpy has no bfloat16)
  json                {"key", "source", "task", "url", "index"}: the original sample, and where it was read

The images are not stored: the hidden states already hold what the target saw of them, and the draft reads only
token ids. Unreadable members are counted skips with their own reasons (see decode.SkipSample).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample, decode_json
from vlm_train.data.encode import EncodedSample
from vlm_train.data.pack_planner import Budget
from vlm_train.jsonio import dumps

FORMAT = "hidden_states"
TOKEN_MEMBERS = ("input_ids.npy", "labels.npy", "position_ids.npy")
HIDDEN_MEMBER = "hidden.safetensors"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_DTYPE = np.int32  # token ids, labels and positions all fit; half the bytes of int64


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=INDEX_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def write_sample(
    key: str, record: dict[str, Any], sample: EncodedSample, aux: torch.Tensor, final: torch.Tensor
) -> dict[str, Any]:
    """The webdataset sample (member -> bytes) of one encoded sample and its target hidden states."""
    n = sample.num_tokens
    if tuple(aux.shape) != (n, 3 * final.shape[-1]) or tuple(final.shape[:1]) != (n,):
        raise ValueError(f"sample {key}: hidden states {tuple(aux.shape)}, {tuple(final.shape)} for {n} tokens")
    if aux.dtype not in STORAGE_DTYPES.values() or final.dtype != aux.dtype:
        raise ValueError(f"sample {key}: hidden states must be one of {sorted(STORAGE_DTYPES)}, got {aux.dtype}")
    hidden = {"aux": aux.detach().cpu().contiguous(), "final": final.detach().cpu().contiguous()}
    return {
        "__key__": key,
        "input_ids.npy": _npy(sample.input_ids),
        "labels.npy": _npy(sample.labels),
        "position_ids.npy": _npy(sample.position_ids),
        HIDDEN_MEMBER: save_safetensors(hidden),
        "json": dumps(record).encode("utf-8"),
    }


def _load_npy(raw: dict[str, Any], member: str) -> np.ndarray:
    if member not in raw:
        raise SkipSample("missing_member", f"no {member} (members {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        array = np.load(io.BytesIO(raw[member]), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError... for a corrupt or truncated file
        raise SkipSample("corrupt_tokens", f"{member}: {type(exc).__name__}: {exc}") from exc
    if not np.issubdtype(array.dtype, np.integer):
        raise SkipSample("corrupt_tokens", f"{member} holds {array.dtype}, not integers")
    return array.astype(np.int64)


def _load_hidden(raw: dict[str, Any], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if HIDDEN_MEMBER not in raw:
        raise SkipSample("missing_member", f"no {HIDDEN_MEMBER}")
    try:
        tensors = load_safetensors(raw[HIDDEN_MEMBER])
    except Exception as exc:  # safetensors raises its own error type for a truncated or corrupt header or body
        raise SkipSample("corrupt_hidden_states", f"{HIDDEN_MEMBER}: {type(exc).__name__}: {exc}") from exc
    aux, final = tensors.get("aux"), tensors.get("final")
    if aux is None or final is None:
        raise SkipSample("corrupt_hidden_states", f"{HIDDEN_MEMBER} holds {sorted(tensors)}, not aux and final")
    if aux.dim() != 2 or final.dim() != 2 or aux.shape[0] != n or final.shape[0] != n:
        raise SkipSample("corrupt_hidden_states", f"aux {list(aux.shape)}, final {list(final.shape)} for {n} tokens")
    if aux.shape[1] != 3 * final.shape[1]:
        raise SkipSample("corrupt_hidden_states", f"aux {list(aux.shape)} is not 3 x final {list(final.shape)}")
    if aux.dtype not in STORAGE_DTYPES.values() or final.dtype != aux.dtype:
        raise SkipSample("corrupt_hidden_states", f"dtypes {aux.dtype}, {final.dtype}")
    return aux, final


def read_sample(raw: dict[str, Any], source: str, pixel_dim: int) -> EncodedSample:
    """An EncodedSample (no image patches; `target_aux`, `target_final` set) from a raw `hidden_states` sample;
    unusable members raise SkipSample. `pixel_dim` is the width of the (empty) pixel array, as the encoder's."""
    if "__error__" in raw:
        raise SkipSample("bad_member", raw["__error__"])
    record = decode_json(raw["json"]) if "json" in raw else {}
    input_ids = _load_npy(raw, "input_ids.npy")
    labels = _load_npy(raw, "labels.npy")
    positions = _load_npy(raw, "position_ids.npy")
    n = int(input_ids.shape[0]) if input_ids.ndim == 1 else -1
    if n < 1 or labels.shape != (n,) or positions.shape != (3, n):
        raise SkipSample(
            "corrupt_tokens",
            f"input_ids {list(input_ids.shape)}, labels {list(labels.shape)}, positions {list(positions.shape)}",
        )
    aux, final = _load_hidden(raw, n)
    key = str(record.get("key", raw.get("__key__", "?")))
    meta = {"key": key, "source": source, "task": str(record.get("task", FORMAT))}
    if "url" in record and "index" in record:  # the original sample, to read it again (tests, provenance)
        meta["origin"] = {"url": record["url"], "index": record["index"]}
    return EncodedSample(
        input_ids=input_ids,
        labels=labels,
        position_ids=positions,
        pixel_values=np.zeros((0, pixel_dim), np.uint8),
        image_grid_thw=np.zeros((0, 3), np.int64),
        meta=meta,
        target_aux=aux,
        target_final=final,
    )


def cut_to_budget(sample: EncodedSample, budget: Budget) -> EncodedSample | None:
    """data.pack.too_long=truncate for a stored sample: its first `budget.tokens` tokens (the target is causal, so
    their stored states are exactly those of the shorter sample); None when no supervised token is left. There are
    no image patches to keep whole: image-pad tokens are plain tokens to the draft."""
    cut = min(sample.num_tokens, budget.tokens)
    labels = sample.labels[:cut].copy()
    labels[-1] = IGNORE_INDEX  # its target was cut off
    if not (labels != IGNORE_INDEX).any():
        return None
    assert sample.target_aux is not None and sample.target_final is not None
    return dataclasses.replace(
        sample,
        input_ids=sample.input_ids[:cut],
        labels=labels,
        position_ids=sample.position_ids[:, :cut],
        target_aux=sample.target_aux[:cut],
        target_final=sample.target_final[:cut],
        meta={**sample.meta, "truncated_from": sample.num_tokens},
    )
