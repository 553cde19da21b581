"""The cheaper training step keeps its results: the folded patch embedding of still images and the bucketed SDPA
attention equal what they replace (the full temporal kernel over repeated frames; attention per segment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vlm_train.model import attention as A
from vlm_train.model.attention import varlen_attention
from vlm_train.model.config import VisionConfig
from vlm_train.model.vit import PatchEmbed, float_pixel_values

VISION = VisionConfig()
ONE_FRAME = VISION.patch_dim // VISION.temporal_patch_size


def _embed(seed: int = 0) -> PatchEmbed:
    torch.manual_seed(seed)
    embed = PatchEmbed(VISION.patch_dim, 48, VISION.temporal_patch_size)
    torch.nn.init.normal_(embed.proj.weight, std=0.05)
    return embed


def _pixels(rows: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (rows, width), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_still_image_patches_take_the_folded_kernel_and_equal_the_repeated_frames():
    embed, pixels = _embed(), _pixels(37, ONE_FRAME)
    ours = embed(pixels)
    ours.square().sum().backward()
    grad, embed.proj.weight.grad = embed.proj.weight.grad, None
    repeated = float_pixel_values(pixels, VISION.patch_dim)  # what HF's Conv3d sees: the frame t times
    reference = embed.proj(repeated)
    reference.square().sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # Every temporal slice of the kernel gets the gradient it gets through the repeat.
    torch.testing.assert_close(grad, embed.proj.weight.grad, rtol=1e-4, atol=1e-4)


def test_still_image_patch_embedding_does_one_frame_of_flops():
    embed, pixels = _embed(), _pixels(16, ONE_FRAME)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        embed(pixels)
    assert counter.get_total_flops() == 2 * 16 * ONE_FRAME * 48


def test_video_patches_of_t_real_frames_keep_the_full_kernel():
    embed, pixels = _embed(), _pixels(12, VISION.patch_dim)  # both frames differ
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ours = embed(pixels)
    assert counter.get_total_flops() == 2 * 12 * VISION.patch_dim * 48
    assert torch.equal(ours, embed.proj(float_pixel_values(pixels, VISION.patch_dim)))


# ---------------------------------------------------------------- attention


def _qkv(lengths: list[int], hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _per_segment(q, k, v, cu, causal):
    """Plain softmax attention segment by segment, in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[a:b]))
    return torch.cat(outs)


# Many short segments of several lengths, a long one, an empty one: buckets with and without padding.
MIXED = [5, 9, 0, 7, 9, 3, 40, 6, 1, 8]


@pytest.mark.parametrize("causal", [False, True])
def test_bucketed_sdpa_equals_attention_per_segment_with_gradients(causal):
    q, k, v, cu = _qkv(MIXED)
    plan = A._buckets(tuple(cu.tolist()), q.device, A.PADDED_AREA_RATIO)
    assert len(plan.shapes) > 1 and plan.dest is not None  # the long segment keeps a bucket of its own
    assert sum(n for n, _ in plan.shapes) == sum(1 for n in MIXED if n)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = varlen_attention(*inputs, cu, None, causal=causal, backend="sdpa")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * weights).sum().backward()
    reference_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    reference = _per_segment(*reference_inputs, cu, causal)
    (reference * weights).sum().backward()
    torch.testing.assert_close(out, reference)
    for ours, theirs in zip(inputs, reference_inputs):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_segments_of_one_length_in_order_are_a_batch_as_they_lie():
    plan = A._buckets((0, 80, 160, 240), torch.device("cpu"), A.PADDED_AREA_RATIO)  # video frames
    assert plan.shapes == ((3, 80),) and plan.dest is None and plan.key_masks == (None,)


def test_ratio_one_pads_nothing():
    lengths = [5, 9, 7, 9, 5]
    plan = A._buckets(tuple(torch.tensor([0, *lengths]).cumsum(0).tolist()), torch.device("cpu"), 1.0)
    assert plan.rows == sum(lengths)
    assert sorted(plan.shapes) == [(1, 7), (2, 5), (2, 9)]


def test_short_segments_share_one_sdpa_call(monkeypatch):
    """A pack of many samples of different lengths (what the packer makes) costs one SDPA call, not one per length."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    lengths = [51, 47, 47, 44, 43, 41, 39, 35, 32, 28]
    q, k, v, cu = _qkv(lengths)
    out = varlen_attention(q.float(), k.float(), v.float(), cu, max(lengths), causal=True, backend="sdpa")
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), _per_segment(q, k, v, cu, True), rtol=1e-5, atol=1e-5)
