import pytest

from helpers import encoder, tiny_tokenizer
from vlm_train.model import VLM, ModelConfig
from vlm_train.train.config import CurriculumConfig, StageConfig
from vlm_train.train.curriculum import lr_factor, set_trainable, validate_curriculum


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


def test_bad_curricula_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        validate_curriculum(CurriculumConfig(stages=[]), model)
    with pytest.raises(ValueError, match=r"stages\.0 .*matches no parameter"):
        validate_curriculum(CurriculumConfig(stages=[StageConfig(name="a", steps=3, trainable=["projektor.*"])]), model)
    with pytest.raises(ValueError, match="schedule"):
        validate_curriculum(CurriculumConfig(stages=[StageConfig(name="a", steps=3, schedule="linear")]), model)
    with pytest.raises(ValueError, match="steps must be positive"):
        validate_curriculum(CurriculumConfig(stages=[StageConfig(name="a", steps=0)]), model)


def test_warmup_then_cosine_to_the_floor():
    stage = StageConfig(name="s", steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(stage, i) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    short = StageConfig(name="s", steps=5, warmup_steps=20)  # warm-up capped at the stage length
    assert lr_factor(short, 4) == pytest.approx(1.0)
    assert lr_factor(StageConfig(name="c", steps=5, schedule="constant"), 3) == 1.0
