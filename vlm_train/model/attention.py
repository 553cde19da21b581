"""Variable-length (packed) attention: many sequences laid end to end, attention confined to each one.

All backends take the same flat layout as flash-attn's varlen API:
q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [S+1] with segment i = rows cu_seqlens[i]:cu_seqlens[i+1].
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "flash_attn", "torch_varlen", "sdpa")

# Flash kernels (flash-attn and torch's varlen op) only exist for 16-bit inputs on Ampere or newer.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MIN_CAPABILITY = (8, 0)


@functools.cache
def _flash_attn_varlen_func() -> Callable | None:
    """The flash-attn package's varlen function, or None when the package is missing or broken."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # a broken CUDA build raises more than ImportError; either way it is unusable
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_attn() -> Callable | None:
    """`torch.nn.attention.varlen.varlen_attn`, or None on torch builds that lack it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _cuda_problem(device: torch.device) -> str | None:
    """Why a flash kernel cannot run on `device`, or None if it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device, got {device.type!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available in this torch build"
    if torch.cuda.get_device_capability(device) < _FLASH_MIN_CAPABILITY:
        return "it needs a GPU of compute capability 8.0 (Ampere) or newer"
    return None


def backend_problem(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why backend `name` cannot run on `device` with `dtype`, or None if it can."""
    if name == "sdpa":
        return None
    if name == "flash_attn" and _flash_attn_varlen_func() is None:
        return "the flash-attn package is not installed (pip install 'vlm_train[gpu]')"
    if name == "torch_varlen" and _torch_varlen_attn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    problem = _cuda_problem(device)
    if problem is None and dtype is not None and dtype not in _FLASH_DTYPES:
        problem = f"it needs float16 or bfloat16 inputs, got {dtype}"
    return problem


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The concrete backend that `name` means on `device`; raises if it cannot run there."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {', '.join(ATTENTION_BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        for candidate in ("flash_attn", "torch_varlen"):
            if backend_problem(candidate, device, dtype) is None:
                return candidate
        return "sdpa"
    problem = backend_problem(name, device, dtype)
    if problem is not None:
        raise RuntimeError(f"attention backend {name!r} cannot run: {problem}")
    return name


def _sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Reference: scaled_dot_product_attention per segment (any device, any dtype).

    Consecutive segments of one length (equal-size images, equal-length samples) go in one batched call.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Query head i reads kv head i // groups, the grouping flash-attn and HF's repeat_kv use.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[0]}, got {bounds[0]}..{bounds[-1]}")
    outs = []
    start = 0
    for length, run in itertools.groupby(b - a for a, b in zip(bounds[:-1], bounds[1:])):
        end = start + length * len(list(run))
        if length:
            # [n*L, H, D] -> [n, H, L, D]: 4-D inputs, or CPU SDPA falls back from its flash kernel to the math
            # one (twice as slow, and it holds the L x L scores).
            qs, ks, vs = (x[start:end].unflatten(0, (-1, length)).transpose(1, 2) for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(1, 2).flatten(0, 1))
        start = end
    if not outs:
        return torch.empty_like(q)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    causal: bool,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over k/v [T, Hkv, D] within each cu_seqlens segment; returns [T, Hq, D]."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"q, k, v must be [T, heads, head_dim], got {shapes}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "sdpa":
        return _sdpa_varlen(q, k, v, cu_seqlens, causal)

    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # v is a strided view of the ViT's fused qkv
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if name == "flash_attn":
        return _flash_attn_varlen_func()(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, causal=causal
        )
    return _torch_varlen_attn()(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        window_size=(-1, 0) if causal else (-1, -1),  # (-1, 0) is how varlen_attn spells "causal"
        enable_gqa=q.shape[1] != k.shape[1],
    )
