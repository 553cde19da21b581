import pytest

from vlm_train.data.config import DataConfig
from vlm_train.model import VLM, ModelConfig
from vlm_train.train.builders import build_data
from vlm_train.train.config import (
    CurriculumConfig,
    FaultConfig,
    LossConfig,
    StageConfig,
    TrainConfig,
)
from vlm_train.train.curriculum import (
    group_lrs,
    param_groups,
    set_trainable,
    stage_data,
    stage_loss,
    validate_curriculum,
)
from vlm_train.train.guards import FaultInjector
from vlm_train.train.schedule import Position, estimate_total_steps, lr_factor
from vlm_train.train.stage_data import RankData

from conftest import make_config
from helpers import encoder, tiny_tokenizer

GROUPS = CurriculumConfig().groups


def _model():
    return VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)


def test_set_trainable_by_module_pattern():
    model = _model()
    trainable = set_trainable(model, ["projector.*"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("projector.") for n in names)
    assert len(trainable) == len(names)
    set_trainable(model, ["*"])
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "stage,match",
    [
        (StageConfig(name="a", steps=3, trainable=["projektor.*"]), r"stages\.0 .*matches no parameter"),
        (StageConfig(name="a", steps=3, schedule="linear"), "schedule"),
        (StageConfig(name="a", steps=0), "exactly one of steps and tokens"),
        (StageConfig(name="a", steps=3, tokens=1000), "exactly one of steps and tokens"),
        (StageConfig(name="a", steps=3, lr_scale={"vit": 0.1}), "unknown groups.*vit"),
        (StageConfig(name="a", steps=3, schedule="wsd", decay_shape="exp"), "decay_shape"),
        (StageConfig(name="a", steps=3, loss={"averaging": "median"}), "averaging"),
        (StageConfig(name="a", steps=3, loss={"averagin": "token"}), r"loss\.averagin: .*did you mean averaging"),
        (
            StageConfig(name="a", steps=3, data={"llm_budget": 512}),
            r"data\.llm_budget: .*did you mean pack\.llm_budget",
        ),
        (StageConfig(name="a", steps=3, data={"pack": {"llm_budget": "big"}}), r"data\.pack\.llm_budget"),
        (StageConfig(name="a", steps=3, data={"pack": {"llm_budget": 0}}), r"llm_budget"),
        (StageConfig(name="a", steps=3, data={"num_workers": 4}), r"num_workers.*cannot change within a run"),
    ],
)
def test_bad_curricula_are_clear_errors(stage, match):
    with pytest.raises(ValueError, match=match):
        validate_curriculum(CurriculumConfig(stages=[stage]), _model(), LossConfig(), DataConfig())


def test_empty_curriculum_and_bad_group_patterns():
    with pytest.raises(ValueError, match="empty"):
        validate_curriculum(CurriculumConfig(stages=[]), _model())
    bad = CurriculumConfig(groups={"vit": ["visual.*"]}, stages=[StageConfig(name="a", steps=1)])
    with pytest.raises(ValueError, match=r"groups\.vit"):
        validate_curriculum(bad, _model())


def test_warmup_then_cosine_to_the_floor():
    stage = StageConfig(name="s", steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(stage, i) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    short = StageConfig(name="s", steps=5, warmup_steps=20)  # warm-up capped at the stage length
    assert lr_factor(short, 4) == pytest.approx(1.0)
    assert lr_factor(StageConfig(name="c", steps=5, schedule="constant"), 3) == 1.0


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_warmup_stable_decay(shape):
    stage = StageConfig(
        name="s", steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.0
    )
    factors = [lr_factor(stage, i) for i in range(100)]
    assert factors[4] == pytest.approx(0.5)
    assert all(f == 1.0 for f in factors[10:80])  # stable
    decay = factors[80:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and factors[-1] == pytest.approx(0.0, abs=1e-9)


def test_a_stage_measured_in_tokens_decays_by_tokens():
    stage = StageConfig(name="t", tokens=10_000, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(stage, 0, 0) == pytest.approx(0.5)
    assert lr_factor(stage, 5, 0) == pytest.approx(1.0)
    assert lr_factor(stage, 5, 5_000) == pytest.approx(0.5)
    assert lr_factor(stage, 9, 10_000) == pytest.approx(0.0, abs=1e-12)
    position = Position(step=5, stage=0, step_in_stage=5, tokens_in_stage=5_000, tokens=5_000)
    assert not position.stage_done(stage)
    position.advance(5_000)
    assert position.stage_done(stage)
    later = StageConfig(name="s", steps=7)
    assert estimate_total_steps([stage, later], Position(step=5, tokens_in_stage=5_000), 1_000.0) == 5 + 5 + 7


def test_parameter_groups_carry_their_lr_scale_and_weight_decay():
    model = _model()
    set_trainable(model, ["projector.*", "llm.*"])
    stage = StageConfig(name="s", steps=10, lr=1e-3, lr_scale={"llm": 0.5}, warmup_steps=0, schedule="constant")
    groups = param_groups(model, stage, GROUPS, TrainConfig(weight_decay=0.1))
    names = {g["name"] for g in groups}
    assert names == {"llm", "llm/no_decay", "projector", "projector/no_decay"}  # frozen vision: no group
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert all((g["weight_decay"] == 0.0) == g["name"].endswith("no_decay") for g in groups)
    lrs = group_lrs(stage, 3, 0, groups)
    assert lrs["llm"] == pytest.approx(5e-4) and lrs["projector/no_decay"] == pytest.approx(1e-3)


def test_stage_overrides_of_loss_and_data():
    stage = StageConfig(
        name="s",
        steps=1,
        loss={"averaging": "square", "source_weights": {"b": 3.0}},
        data={"pack": {"llm_budget": 512}, "image": {"max_pixels": 6272}, "mixture": {"a": 1.0}},
    )
    loss = stage_loss(LossConfig(averaging="mix", position_power=0.5, source_weights={"a": 2.0}), stage)
    assert loss.averaging == "square" and loss.position_power == 0.5
    assert loss.source_weights == {"a": 2.0, "b": 3.0}  # merged onto the run's
    data = stage_data(DataConfig(mixture={"a": 0.5, "b": 0.5}), stage)
    assert data.pack.llm_budget == 512 and data.image.max_pixels == 6272
    assert data.mixture == {"a": 1.0}  # a stage's mixture replaces the run's: b drops out
    assert (
        data.pack.vit_budget == DataConfig().pack.vit_budget
        and stage_data(DataConfig(), StageConfig(name="x")) == DataConfig()
    )


def test_stage_data_overrides_reach_the_packs():
    cfg = make_config()
    setup = build_data(cfg.data, cfg.model)
    data = RankData(setup, cfg.data, cfg.model, seed=0, rank=0, world_size=1, faults=FaultInjector(FaultConfig(), 0))
    small = StageConfig(name="small", steps=1, data={"pack": {"llm_budget": 512}, "image": {"max_pixels": 56 * 56}})
    data.enter(small)
    packs = data.next_packs(3)
    assert data.budgets[0] == 512 and all(p.num_tokens <= 512 for p in packs)
    assert all(int(h * w) <= 16 for p in packs for _, h, w in p.image_grid_thw.tolist())  # 56 x 56 px: 4 x 4 patches
    data.enter(StageConfig(name="full", steps=1))  # the data config's own budgets and resolution, same stream
    packs = data.next_packs(3)
    assert max(p.num_tokens for p in packs) > 512
    assert max(int(h * w) for p in packs for _, h, w in p.image_grid_thw.tolist()) > 16
    data.close()


@pytest.mark.parametrize("preset,stages", [("default", 2), ("llava", 2), ("internvl2_5", 3), ("points1_5", 3)])
def test_presets_compose_and_validate(preset, stages):
    cfg = make_config(f"curriculum={preset}")
    assert len(cfg.curriculum.stages) == stages
    validate_curriculum(cfg.curriculum, _model(), cfg.loss)
    if preset == "llava":
        assert all(not any(p.startswith("vision") for p in s.trainable) for s in cfg.curriculum.stages)
    if preset == "internvl2_5":
        assert all(s.tokens > 0 and s.loss["averaging"] == "square" for s in cfg.curriculum.stages)
        assert cfg.curriculum.stages[-1].lr_scale["vision"] == pytest.approx(0.1)
    if preset == "points1_5":
        assert cfg.curriculum.stages[0].data["image"]["max_pixels"] and cfg.curriculum.stages[-1].schedule == "wsd"
