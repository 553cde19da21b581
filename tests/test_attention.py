"""varlen_attention: every backend equals a dense block-diagonal reference."""

import math

import pytest
import torch

from vlm_train.model.attention import ATTENTION_BACKENDS, backend_problem, resolve_backend, varlen_attention

LENGTHS = [5, 1, 9, 3]  # includes a length-1 segment, the edge case kernels get wrong


def _inputs(hq, hkv, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k.to(**to), v.to(**to), cu.to(device), max(LENGTHS)


def _dense_reference(q, k, v, cu, causal):
    """Softmax attention over the full [T, T] score matrix with a block-diagonal (and causal) mask."""
    q, k, v = q.double(), k.double(), v.double()
    t, hq, d = q.shape
    groups = hq // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long().cpu())
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_sdpa_matches_dense_reference(causal, hq, hkv):
    q, k, v, cu, max_len = _inputs(hq, hkv)
    out = varlen_attention(q, k, v, cu, max_len, causal=causal, backend="sdpa")
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, cu, causal), atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_flow_to_all_inputs():
    q, k, v, cu, max_len = _inputs(4, 2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    varlen_attention(q, k, v, cu, max_len, causal=True, backend="sdpa").sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_auto_resolves_to_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    q, k, v, cu, max_len = _inputs(4, 2)
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max_len, causal=True),
        varlen_attention(q, k, v, cu, max_len, causal=True, backend="sdpa"),
    )


def test_unknown_backend_is_a_value_error_listing_valid_ones():
    q, k, v, cu, max_len = _inputs(2, 2)
    with pytest.raises(ValueError, match="sdpa"):
        varlen_attention(q, k, v, cu, max_len, causal=False, backend="xformers")
    with pytest.raises(ValueError, match="flash_attn"):
        resolve_backend("flash", "cpu")


def test_heads_not_multiple_of_kv_heads_is_a_value_error():
    q, k, v, cu, max_len = _inputs(3, 2)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, v, cu, max_len, causal=False, backend="sdpa")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_only_backends_fail_clearly_on_cpu(backend):
    q, k, v, cu, max_len = _inputs(2, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=backend):
        varlen_attention(q, k, v, cu, max_len, causal=True, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", [b for b in ATTENTION_BACKENDS if b != "auto"])
def test_cuda_backends_agree_in_16_bit(backend, causal, dtype):
    device = torch.device("cuda")
    problem = backend_problem(backend, device, dtype)
    if problem is not None:
        pytest.skip(f"{backend}: {problem}")
    q, k, v, cu, max_len = _inputs(4, 2, d=64, dtype=dtype, device="cuda")
    out = varlen_attention(q, k, v, cu, max_len, causal=causal, backend=backend)
    ref = _dense_reference(q.float(), k.float(), v.float(), cu, causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_backend_gradients_agree_with_sdpa_in_16_bit(backend, dtype):
    device = torch.device("cuda")
    problem = backend_problem(backend, device, dtype)
    if problem is not None:
        pytest.skip(f"{backend}: {problem}")
    grads = {}
    for name in ("sdpa", backend):
        q, k, v, cu, max_len = _inputs(4, 2, d=64, dtype=dtype, device="cuda", seed=3)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = varlen_attention(q, k, v, cu, max_len, causal=True, backend=name)
        out.float().square().sum().backward()
        grads[name] = (out.detach(), q.grad, k.grad, v.grad)
    for ours, ref in zip(grads[backend], grads["sdpa"]):
        torch.testing.assert_close(ours.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_whole_vlm_agrees_across_backends_on_gpu(backend):
    """Windowed ViT + GQA decoder on a real pack: logits under each CUDA backend match sdpa within bf16 tolerance."""
    from vlm_train.data.collate import collate
    from vlm_train.model import VLM, LLMConfig, ModelConfig, VisionConfig

    from helpers import encoder, sample, tiny_tokenizer

    device = torch.device("cuda")
    problem = backend_problem(backend, device, torch.bfloat16)
    if problem is not None:
        pytest.skip(f"{backend}: {problem}")
    torch.manual_seed(0)
    vision = VisionConfig(hidden_size=128, num_heads=2, window_size=56, fullatt_block_indexes=[1])
    cfg = ModelConfig(
        vision=vision,
        llm=LLMConfig(hidden_size=256, num_heads=4, num_kv_heads=2, mrope_section=[8, 12, 12]),
        attn_backend="sdpa",
    )
    enc = encoder()
    model = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=enc.special.image_pad).to(device)
    batch = collate([enc.encode(sample(f"s{i}", "a red circle", images=i % 3, seed=i)) for i in range(4)]).to(device)
    logits = {}
    for name in ("sdpa", backend):
        model.set_attn_backend(name)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits[name] = model(batch).logits.float()
    torch.testing.assert_close(logits[backend], logits["sdpa"], atol=5e-2, rtol=5e-2)
