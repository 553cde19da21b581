"""Variable-length (packed) attention: many sequences laid end to end, attention confined to each one.

All backends take the same flat layout as flash-attn's varlen API:
q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [S+1] with segment i = rows cu_seqlens[i]:cu_seqlens[i+1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

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


# A segment joins the bucket being filled (segments taken longest first) while the bucket's padded score area,
# segments x longest^2, stays within this multiple of the area its segments need. Many short segments (a pack of
# small images or short samples) then share one SDPA call, where a call each cost more than the padding; a few long
# ones keep buckets of their own, so padding never costs much more than the attention itself.
PADDED_AREA_RATIO = 2.0


@dataclass(frozen=True)
class _Buckets:
    """How _sdpa_varlen lays a pack's segments out: buckets of right-padded segments, one after another."""

    shapes: tuple[tuple[int, int], ...]  # (segments, padded length) of each bucket, in buffer order
    rows: int  # rows of the padded buffer: sum of segments x length
    dest: torch.Tensor | None  # long [T]: each token's row in the buffer; None when the buffer is the input
    key_masks: tuple[torch.Tensor | None, ...]  # per bucket, bool [n, 1, 1, L] of real keys (None: no padding)


@functools.lru_cache(maxsize=16)
def _buckets(bounds: tuple[int, ...], device: torch.device, ratio: float) -> _Buckets:
    """Buckets for cu_seqlens `bounds` under PADDED_AREA_RATIO `ratio` (cached: every layer of a tower attends
    over the same segments). At ratio 1 only segments of one length share a bucket: nothing is padded."""
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])  # stable: ties keep order
    shapes: list[tuple[int, int]] = []
    start = [0] * len(lengths)  # first buffer row of each segment
    padded = area = rows = 0
    for i in order:
        n = lengths[i]
        if shapes and (shapes[-1][0] + 1) * shapes[-1][1] ** 2 <= ratio * (area + n * n):
            count, longest = shapes[-1]
            shapes[-1] = (count + 1, longest)
        else:
            rows += padded
            shapes.append((1, n))
            padded, area, longest = 0, 0, n
        start[i] = rows + padded
        padded += longest
        area += n * n
    rows += padded
    total = bounds[-1]
    identity = rows == total and all(start[i] == bounds[i] for i in order)
    dest = None
    if not identity:
        offsets = torch.tensor([s - b for s, b in zip(start, bounds[:-1])], dtype=torch.long)
        dest = (torch.arange(total) + offsets.repeat_interleave(torch.tensor(lengths))).to(device)
    key_masks, first = [], 0
    for count, longest in shapes:
        real = torch.tensor([lengths[i] for i in order[first : first + count]])
        first += count
        if bool((real == longest).all()):
            key_masks.append(None)
        else:
            key_masks.append((torch.arange(longest) < real[:, None]).view(count, 1, 1, longest).to(device))
    return _Buckets(tuple(shapes), rows, dest, tuple(key_masks))


def _sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Reference: scaled_dot_product_attention over segments right-padded into buckets (any device, any dtype).

    Segments of one length in their pack order (equal-size images, video frames) are a batch as they lie. Otherwise
    the tokens are scattered into a buffer of buckets (see PADDED_AREA_RATIO) and gathered back after: one SDPA
    call per bucket. Padding is never attended by a real token: causal masking already hides keys after a
    query's segment, and bidirectional buckets get a key mask; padded queries' outputs are dropped.
    """
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[0]}, got {bounds[0]}..{bounds[-1]}")
    plan = _buckets(tuple(bounds), q.device, PADDED_AREA_RATIO)
    if not plan.shapes:
        return torch.empty_like(q)
    if plan.dest is not None:
        q, k, v = (x.new_zeros(plan.rows, *x.shape[1:]).index_copy(0, plan.dest, x) for x in (q, k, v))
    # Query head i reads kv head i // groups, the grouping flash-attn and HF's repeat_kv use.
    gqa = q.shape[1] != k.shape[1]
    outs, start, whole = [], 0, len(plan.shapes) == 1  # one bucket: no slice (its backward copies the gradient)
    for (count, length), mask in zip(plan.shapes, plan.key_masks):
        end = start + count * length
        # [n*L, H, D] -> [n, H, L, D]: 4-D inputs, or CPU SDPA falls back from its flash kernel to the math one
        # (twice as slow, and it holds the L x L scores).
        qs, ks, vs = ((x if whole else x[start:end]).unflatten(0, (count, length)).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=None if causal else mask, is_causal=causal, enable_gqa=gqa
        )
        outs.append(out.transpose(1, 2).flatten(0, 1))
        start = end
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if plan.dest is None else out.index_select(0, plan.dest)


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
