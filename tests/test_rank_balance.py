"""FLOPs balancing in the packer: the per-sample cost model equals pack_flops, budgets and exact resume hold, and
the per-pack FLOPs spread falls; tools/bench_rank_balance.py prints its figures."""

import json
import statistics

import numpy as np
import pytest

from tools import bench_rank_balance
from tools.pack_mix import make_mix
from vlm_train.data.collate import collate
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import ImageSampling
from vlm_train.data.pack_planner import Budget, FlopsTarget, Item, PackPlanner
from vlm_train.data.packer import PackConfig, Packer, _item
from vlm_train.model.flops import flops_cost, pack_flops

from helpers import SPEC, flops_model_config, noise_image, tiny_tokenizer


def _samples(n: int, drop: bool = False) -> list:
    """Encoded samples: 0-2 images of sizes that leave partial windows at the edges, answers of varied length."""
    sampling = ImageSampling(drop_prob=1.0, drop_rate_min=0.2, drop_rate_max=0.6) if drop else ImageSampling()
    enc = Encoder(tiny_tokenizer(), SPEC, sampling)
    samples = []
    for i in range(n):
        pictures = [noise_image(168 - 28 * (i % 3), 112 + 14 * (i % 5), i), noise_image(84, 140, 100 + i)][: i % 3]
        turns = [
            Turn("user", IMAGE_PLACEHOLDER * len(pictures) + "Describe."),
            Turn("assistant", "a red circle " * (i % 9)),
        ]
        sample = Sample(f"s{i}", "test", "caption", pictures, turns, {})
        samples.append(enc.encode(sample, rng=np.random.default_rng(i) if drop else None))
    return samples


def _cost_of(cost, samples) -> int:
    items = [_item(s) for s in samples]
    dummy = cost.no_image if not any(i.images for i in items) else 0
    return dummy + sum(cost.sample(i.tokens, i.supervised, i.patches, i.grids) for i in items)


@pytest.mark.parametrize("window", [True, False], ids=["windows", "full"])
def test_cost_model_equals_pack_flops_on_real_packs(window):
    cfg = flops_model_config(window)
    cost = flops_cost(cfg)
    packer = Packer(PackConfig(llm_budget=400, vit_budget=2000, buffer_size=4, flops_cost=cost))
    samples = _samples(24)
    packs = [p for s in samples for p in packer.add(s)] + packer.flush()
    assert len(packs) > 3 and any(not any(s.num_patches for s in p) for p in packs + [samples[:1]])
    for pack in packs + [samples[:1]]:  # samples[:1]: a text-only pack, which runs the dummy image
        assert _cost_of(cost, pack) == pack_flops(cfg, collate(pack)).training


def test_cost_model_estimates_dropped_tokens_closely():
    cfg = flops_model_config(window=True)
    samples = _samples(8, drop=True)
    batch = collate(samples, image_token_id=Encoder(tiny_tokenizer(), SPEC).special.image_pad)
    exact = pack_flops(cfg, batch).training
    assert sum(s.num_patches for s in samples) < int(batch.image_grid_thw.prod(-1).sum())  # tokens were dropped
    assert abs(_cost_of(flops_cost(cfg), samples) / exact - 1) < 0.01


def test_flops_cost_needs_the_vocabulary():
    cfg = flops_model_config(window=False)
    cfg.llm.vocab_size = 0
    with pytest.raises(ValueError, match="vocabulary size"):
        flops_cost(cfg)
    assert flops_cost(cfg, vocab_size=64).supervised == 3 * 2 * cfg.llm.hidden_size * 64


def _mix_items(records: list[dict]) -> list[tuple]:
    return [
        (r["llm_tokens"], r["vit_patches"], r["images"], r["supervised"], tuple(map(tuple, r["grids"])))
        for r in records
    ]


def _pack(budget: Budget, buffer: int, sizes: list[tuple]) -> list[list[Item]]:
    planner = PackPlanner(budget, buffer)
    packs = []
    for index, (tokens, patches, images, supervised, grids) in enumerate(sizes):
        packs += planner.push(Item(tokens, patches, images, index, supervised=supervised, grids=grids))
    return packs + planner.flush()


def _pack_cost(cost, sizes: list[tuple]) -> int:
    dummy = cost.no_image if not any(images for _, _, images, _, _ in sizes) else 0
    return dummy + sum(
        cost.sample(tokens, supervised, patches, grids) for tokens, patches, _, supervised, grids in sizes
    )


@pytest.fixture(scope="module")
def cost_3b():
    return flops_cost(bench_rank_balance.preset_config("qwen2_5_vl_3b"))


@pytest.fixture(scope="module")
def mix():
    return [r for r in make_mix(3000, 7) if r["llm_tokens"] <= 8192]


def test_balancing_keeps_every_budget_and_is_deterministic(cost_3b, mix):
    budget = Budget(8192, 16384, 12, FlopsTarget(cost_3b, 0.002))
    sizes = [s for s in _mix_items(mix) if s[1] <= 16384 and s[2] <= 12]
    packs = _pack(budget, 64, sizes)
    assert sorted(i.payload for p in packs for i in p) == list(range(len(sizes)))
    for pack in packs:
        assert sum(i.tokens for i in pack) <= 8192
        assert sum(i.patches for i in pack) <= 16384
        assert sum(i.images for i in pack) <= 12
    assert [[i.payload for i in p] for p in _pack(budget, 64, sizes)] == [[i.payload for i in p] for p in packs]


def test_balancing_lowers_the_per_pack_flops_spread(cost_3b, mix):
    sizes = _mix_items(mix)
    figures = {}
    for name, target in [("off", None), ("on", FlopsTarget(cost_3b, 0.002))]:
        budget = Budget(8192, 32768, 0, target)
        packs = _pack(budget, 128, sizes)[:-20]  # leave out the end-of-stream flush
        flops = [_pack_cost(cost_3b, [sizes[i.payload] for i in p]) for p in packs]
        mean = statistics.fmean(flops)
        tokens = sum(i.tokens for p in packs for i in p)
        figures[name] = (max(flops) / mean, statistics.pstdev(flops) / mean, tokens / (len(packs) * 8192))
    (off_max, off_cv, off_fill), (on_max, on_cv, on_fill) = figures["off"], figures["on"]
    assert on_cv < 0.5 * off_cv and on_max < off_max
    assert on_fill > off_fill - 0.002  # the packs stay as full


def test_exact_resume_with_balancing():
    cost = flops_cost(flops_model_config(window=True))
    cfg = PackConfig(llm_budget=300, vit_budget=2000, buffer_size=6, flops_cost=cost)
    samples = _samples(40)
    by_key = {s.meta["key"]: s for s in samples}
    keys = lambda packs: [[s.meta["key"] for s in p] for p in packs]
    uninterrupted = Packer(cfg)
    expected = keys([p for s in samples for p in uninterrupted.add(s)] + uninterrupted.flush())
    packer = Packer(cfg)
    before = [p for s in samples[:17] for p in packer.add(s)]
    restored = Packer(cfg)
    restored.load_state_dict(json.loads(json.dumps(packer.state_dict())), lambda key: by_key[key["key"]])
    after = [p for s in samples[17:] for p in restored.add(s)] + restored.flush()
    assert keys(before) + keys(after) == expected
    assert cfg.budget().flops is not None and PackConfig(flops_cost=cost, flops_corridor=0).budget().flops is None


def test_bench_prints_the_spread_before_and_after(capsys):
    argv = ["--ranks", "2", "--samples-per-rank", "400", "--worlds", "2", "--micro", "1", "2", "--buffer", "32"]
    assert bench_rank_balance.main([*argv, "--corridors", "0", "0.002"]) == 0
    result = json.loads(capsys.readouterr().out)
    off, on = result["corridors"]["0.0"], result["corridors"]["0.002"]
    for run in (off, on):
        assert run["checked_packs"] > 0 and 0.9 < run["efficiency"] <= 1
        assert run["pack_max_over_mean"] >= run["steps"]["W2xM1"]["rank_max_over_mean"] >= 1
        assert set(run["steps"]) == {"W2xM1", "W2xM2"}
    assert on["pack_cv"] < off["pack_cv"]
    with pytest.raises(SystemExit) as done:
        bench_rank_balance.main(["--help"])
    assert done.value.code == 0
