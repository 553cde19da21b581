import json
import math

import pytest
import torch
import webdataset as wds

from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.loader import PackedStream, Source, build_loader
from vlm_train.model import VLM, ModelConfig
from vlm_train.train import loss as L
from vlm_train.train.config import LossConfig

from helpers import encoder, sample, tiny_tokenizer
from test_loader import _png

ANSWERS = ["a red circle", "a blue square and a green diamond", "(052,310),(480,795)", "an orange triangle"]
POLICIES = [
    LossConfig(averaging="token"),
    LossConfig(averaging="sample"),
    LossConfig(averaging="square"),
    LossConfig(averaging="mix", per_sample_weight=0.3),
    LossConfig(averaging="mix", position_power=0.7, source_weights={"b": 3.0}, importance_field="weight"),
]


def _samples(n=4):
    enc, out = encoder(), []
    for i in range(n):
        s = sample(f"s{i}", ANSWERS[i % 4], images=i % 2, seed=i)
        s.source = "ab"[i % 2]
        encoded = enc.encode(s)
        encoded.meta["weight"] = float(i + 1)
        out.append(encoded)
    return out


def _totals(packs, policy):
    return sum((L.pack_totals(p, policy) for p in packs), L.StepTotals(0, 0))


def _per_sample(batch, coefficients):
    return torch.zeros(batch.num_samples, dtype=torch.float64).index_add_(0, batch.sample_index, coefficients.double())


def _supervised(batch):
    return torch.bincount(batch.sample_index[batch.labels != -100], minlength=batch.num_samples).double()


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.averaging + ("+factors" if p.position_power else ""))
def test_coefficients_of_a_step_sum_to_one(policy):
    packs = [collate(_samples()[:2]), collate(_samples()[2:])]
    totals = _totals(packs, policy)
    total = sum(float(L.token_coefficients(p, totals, policy).double().sum()) for p in packs)
    assert total == pytest.approx(1.0, abs=1e-6)
    for p in packs:  # no weight on unsupervised tokens
        assert not L.token_coefficients(p, totals, policy)[p.labels == -100].any()


def test_sample_square_and_token_averaging_give_the_documented_shares():
    batch = collate(_samples())
    x = _supervised(batch)
    shares = {}
    for averaging in ("sample", "square", "token"):
        policy = LossConfig(averaging=averaging)
        shares[averaging] = _per_sample(batch, L.token_coefficients(batch, L.pack_totals(batch, policy), policy))
    torch.testing.assert_close(shares["sample"], torch.full_like(x, 1 / len(x)))  # 1/x: every sample alike
    torch.testing.assert_close(shares["square"], x.sqrt() / x.sqrt().sum())  # 1/sqrt x: a sample counts sqrt x
    torch.testing.assert_close(shares["token"], x / x.sum())  # every token alike
    alpha = LossConfig(averaging="mix", per_sample_weight=0.25)
    mixed = _per_sample(batch, L.token_coefficients(batch, L.pack_totals(batch, alpha), alpha))
    torch.testing.assert_close(mixed, 0.25 * shares["sample"] + 0.75 * shares["token"])
    # A bare alpha is the mix without factors (the older call).
    torch.testing.assert_close(
        L.token_coefficients(batch, L.pack_totals(batch), 0.25).double(),
        L.token_coefficients(batch, L.pack_totals(batch, alpha), alpha).double(),
    )


def test_importance_by_source_and_by_sample_field():
    batch = collate(_samples())
    by_source = LossConfig(averaging="sample", source_weights={"b": 3.0})
    share = _per_sample(batch, L.token_coefficients(batch, L.pack_totals(batch, by_source), by_source))
    expected = torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(share, expected / expected.sum())
    by_field = LossConfig(averaging="sample", importance_field="weight")
    share = _per_sample(batch, L.token_coefficients(batch, L.pack_totals(batch, by_field), by_field))
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(share, expected / expected.sum())


def test_position_factor_decays_within_each_sample():
    batch = collate(_samples())
    policy = LossConfig(averaging="token", position_power=1.0)
    weights = L.token_coefficients(batch, L.pack_totals(batch, policy), policy).double()
    for s in range(batch.num_samples):
        mine = weights[(batch.sample_index == s) & (batch.labels != -100)]
        ratios = mine[0] / mine  # (k + 1) ** 1 for the k-th supervised token
        torch.testing.assert_close(ratios, torch.arange(1, len(mine) + 1, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "policy,match",
    [
        (LossConfig(averaging="mean"), "averaging"),
        (LossConfig(per_sample_weight=1.5), "per_sample_weight"),
        (LossConfig(source_weights={"a": -1.0}), "source_weights"),
        (LossConfig(position_power=math.inf), "position_power"),
    ],
)
def test_bad_loss_configs_are_clear_errors(policy, match):
    batch = collate(_samples())
    with pytest.raises(ValueError, match=match):
        L.token_coefficients(batch, L.pack_totals(batch, policy), policy)


def test_a_negative_sample_importance_names_the_sample():
    samples = _samples()
    samples[2].meta["weight"] = -1.0
    policy = LossConfig(importance_field="weight")
    with pytest.raises(ValueError, match="s2.*weight"):
        L.pack_totals(collate(samples), policy)


def _gradients(model, packs, policy, chunk_size):
    model.zero_grad()
    totals = _totals(packs, policy)
    loss = 0.0
    for pack in packs:
        losses = L.token_cross_entropy(
            model(pack, return_logits=False).hidden, pack.labels, model.llm.lm_head, chunk_size
        )
        micro = L.weighted_loss(losses, L.token_coefficients(pack, totals, policy))
        micro.backward()
        loss += float(micro.detach())
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", POLICIES[1:4:2] + POLICIES[-1:], ids=["sample", "mix", "factors"])
def test_loss_and_gradients_do_not_depend_on_micro_batching(policy):
    torch.manual_seed(0)
    model = VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    samples = _samples()
    one_loss, one_grads = _gradients(model, [collate(samples)], policy, L.DEFAULT_CHUNK_SIZE)
    # Four micro-batches, with the LM head called once per pack (as under ZeRO-3): the same step.
    four_loss, four_grads = _gradients(model, [collate([s]) for s in samples], policy, chunk_size=0)
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
    by_source = L.loss_sums_by(batch, losses, "source")
    assert set(by_source) == {"a", "b"} and sum(n for _, n in by_source.values()) == int(supervised.sum())


def test_a_samples_importance_travels_from_its_json_in_a_shard_to_the_loss(tmp_path):
    """End to end: key.json {"caption": ..., "importance": w} -> loader -> pack meta -> per-sample loss share."""
    weights = {f"k{i}": float(i % 4) for i in range(12)}  # 0 (a sample that must not count) to 3
    url = str(tmp_path / "weighted.tar")
    with wds.TarWriter(url) as writer:
        for i, (key, weight) in enumerate(weights.items()):
            record = {"caption": f"a red circle number {i}", "importance": weight, "note": "not a number"}
            if i == 5:
                del record["importance"]  # no field: weight 1
            writer.write({"__key__": key, "png": _png(i), "json": json.dumps(record).encode()})
    cfg = DataConfig(shuffle_buffer=4)
    cfg.pack.llm_budget, cfg.pack.buffer_size = 400, 4
    loader = build_loader(PackedStream([Source("web", [url])], encoder(), cfg, seed=0, rank=0, world_size=1), 0)
    batch = next(loader)
    loader.close()
    keys = [m["key"] for m in batch.meta]
    assert len(keys) > 2 and all("note" not in m for m in batch.meta)
    policy = LossConfig(averaging="sample", importance_field="importance")
    share = _per_sample(batch, L.token_coefficients(batch, L.pack_totals(batch, policy), policy))
    expected = torch.tensor([1.0 if k == "k5" else weights[k] for k in keys], dtype=torch.float64)
    torch.testing.assert_close(share, expected / expected.sum())
