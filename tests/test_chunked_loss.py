"""The chunked cross-entropy equals the full-logits one in loss and gradients, without holding [T, vocab] logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.collate import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.model.chunked_loss import chunked_cross_entropy
from vlm_train.train import loss as L

from helpers import encoder, sample, tiny_tokenizer

T, D, V = 37, 16, 50


def _inputs(ignored=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignored] = IGNORE_INDEX
    head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    weights = torch.rand(T, generator=g)
    return hidden, labels, head, weights


def _losses_and_grads(hidden, labels, head, weights, chunk_size):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    if chunk_size is None:
        losses = L.token_cross_entropy(head(hidden), labels)
    else:
        losses = L.token_cross_entropy(hidden, labels, head=head, chunk_size=chunk_size)
    (losses * weights).sum().backward()
    return losses.detach(), hidden.grad, head.weight.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_equals_full_logits_in_loss_and_gradients(chunk_size):
    hidden, labels, head, weights = _inputs()
    full = _losses_and_grads(hidden, labels, head, weights, None)
    chunked = _losses_and_grads(hidden, labels, head, weights, chunk_size)
    for a, b in zip(chunked, full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.all(chunked[0][labels == IGNORE_INDEX] == 0)


def test_pack_without_supervised_tokens_still_reaches_the_head():
    hidden, labels, head, weights = _inputs(ignored=1.0)
    losses, hidden_grad, head_grad = _losses_and_grads(hidden, labels, head, weights, 4)
    assert torch.all(losses == 0) and torch.all(hidden_grad == 0)
    assert head_grad is not None and torch.all(head_grad == 0)  # in the graph, so every rank syncs it


def test_no_full_logits_are_saved_for_backward():
    hidden, labels, head, _ = _inputs(ignored=0.0)
    hidden.requires_grad_(True)
    sizes = []

    def record(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        chunked_cross_entropy(hidden, head, labels, chunk_size=4).sum()
    assert max(sizes) < T * V  # only inputs and per-chunk bookkeeping
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        L.token_cross_entropy(head(hidden), labels).sum()
    assert max(sizes) >= T * V  # the plain path keeps [T, V]: what the chunked one avoids


def test_bad_chunk_size_is_a_value_error():
    hidden, labels, head, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, head, labels, chunk_size=0)


def test_vlm_hidden_states_with_the_chunked_loss_match_the_logits_path():
    enc = encoder()
    batch = collate([enc.encode(sample(f"s{i}", "a blue square", images=i % 2, seed=i)) for i in range(3)])
    torch.manual_seed(0)
    model = VLM(
        ModelConfig(attn_backend="sdpa"), vocab_size=len(tiny_tokenizer()), image_token_id=enc.special.image_pad
    )
    coefficients = L.token_coefficients(batch, L.pack_totals(batch), 0.5)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            losses = L.token_cross_entropy(
                model(batch, return_logits=False).hidden, batch.labels, head=model.llm.lm_head, chunk_size=5
            )
        else:
            losses = L.token_cross_entropy(model(batch).logits, batch.labels)
        L.weighted_loss(losses, coefficients).backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-7, rtol=1e-4, msg=name)


def test_the_liger_kernel_is_an_option_that_says_what_it_needs():
    from vlm_train.train.config import LossConfig

    hidden, labels, head, _ = _inputs()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"loss\.kernel=liger cannot run: it needs a CUDA device.*chunked"):
            L.token_cross_entropy(hidden, labels, head, kernel="liger")
    with pytest.raises(ValueError, match="kernel 'fused' is not one of"):
        L.check_loss(LossConfig(kernel="fused"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_liger_kernel_gives_the_chunked_losses_and_gradients_on_a_gpu():
    from vlm_train.model.fused_loss import liger_problem

    problem = liger_problem(torch.device("cuda"))
    if problem is not None:
        pytest.skip(problem)
    hidden, labels, head, weights = (x.cuda() for x in _inputs())  # tensors and the head module alike
    results = {}
    for kernel in ("chunked", "liger"):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        losses = L.token_cross_entropy(h, labels, head, kernel=kernel)
        (losses * weights).sum().backward()
        results[kernel] = (losses.detach(), h.grad, head.weight.grad.clone())
    for ours, reference in zip(results["liger"], results["chunked"]):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
