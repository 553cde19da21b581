import pytest
import torch

from helpers import encoder, sample, tiny_tokenizer
from vlm_train.data.packer import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.train import loss as L


def _samples(n=4):
    enc = encoder()
    answers = ["a red circle", "a blue square and a green diamond", "(052,310),(480,795)", "an orange triangle"]
    return [enc.encode(sample(f"s{i}", answers[i % 4], images=i % 2, seed=i)) for i in range(n)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_coefficients_of_a_step_sum_to_one(alpha):
    packs = [collate(_samples()[:2]), collate(_samples()[2:])]
    totals = sum((L.pack_totals(p) for p in packs), L.StepTotals(0, 0))
    total = sum(float(L.token_coefficients(p, totals, alpha).sum()) for p in packs)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_per_sample_averaging_gives_each_sample_equal_weight():
    batch = collate(_samples())
    coefficients = L.token_coefficients(batch, L.pack_totals(batch), per_sample_weight=1.0)
    per_sample = torch.zeros(batch.num_samples).index_add_(0, batch.sample_index, coefficients)
    torch.testing.assert_close(per_sample, torch.full((batch.num_samples,), 1 / batch.num_samples))
    with pytest.raises(ValueError, match="per_sample_weight"):
        L.token_coefficients(batch, L.pack_totals(batch), per_sample_weight=1.5)


def _gradients(model, packs, alpha):
    model.zero_grad()
    totals = sum((L.pack_totals(p) for p in packs), L.StepTotals(0, 0))
    loss = 0.0
    for pack in packs:
        micro = L.weighted_loss(L.token_cross_entropy(model(pack).logits, pack.labels), L.token_coefficients(pack, totals, alpha))
        micro.backward()
        loss += float(micro.detach())
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_and_gradients_do_not_depend_on_micro_batching(alpha):
    torch.manual_seed(0)
    model = VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    samples = _samples()
    one_loss, one_grads = _gradients(model, [collate(samples)], alpha)
    four_loss, four_grads = _gradients(model, [collate([s]) for s in samples], alpha)
    assert four_loss == pytest.approx(one_loss, rel=1e-5)
    for name, grad in one_grads.items():
        torch.testing.assert_close(four_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_loss_sums_by_source_and_task():
    batch = collate(_samples())
    losses = torch.arange(batch.num_tokens, dtype=torch.float32)
    sums = L.loss_sums_by(batch, losses, "task")
    supervised = batch.labels != -100
    assert sums["caption"][1] == int(supervised.sum())
    assert sums["caption"][0] == pytest.approx(float(losses[supervised].sum()))
