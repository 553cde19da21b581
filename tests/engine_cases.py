"""The fixed model, samples, loss policy and one-step stage that the engine tests split over ranks and micro-batches."""

from __future__ import annotations

import functools

import torch

from vlm_train.data.collate import collate
from vlm_train.data.encode import EncodedSample
from vlm_train.model import VLM, ModelConfig
from vlm_train.train.config import LossConfig, StageConfig, TrainConfig
from vlm_train.train.curriculum import param_groups, set_trainable

from helpers import encoder, sample, tiny_tokenizer

# Every weighting at once: a mix of per-sample and per-token, position decay, importance by source.
LOSS = LossConfig(averaging="mix", per_sample_weight=0.3, position_power=0.5, source_weights={"b": 2.0})
ANSWERS = ["a red circle", "a blue square and a green diamond", "(052,310),(480,795)", "an orange triangle"]


def make_model() -> VLM:
    torch.manual_seed(0)
    cfg = ModelConfig()
    cfg.llm.num_layers = 1
    return VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)


@functools.lru_cache(maxsize=1)
def samples() -> tuple[EncodedSample, ...]:
    """Four samples with images, then four text-only ones; sources alternate a / b."""
    enc, out = encoder(), []
    for i in range(8):
        s = sample(f"s{i}", ANSWERS[i % 4], images=1 if i < 4 else 0, seed=i)
        s.source = "ab"[i % 2]
        out.append(enc.encode(s))
    return tuple(out)


def all_packs() -> list:
    """The four micro-batches of the step: two with images, two text-only."""
    s = samples()
    return [collate(list(s[i : i + 2])) for i in range(0, 8, 2)]


def rank_packs(rank: int, world_size: int) -> list:
    """Rank 0 of 2 gets the packs with images, rank 1 only text-only packs (modality skew)."""
    packs = all_packs()
    per_rank = len(packs) // world_size
    return packs[rank * per_rank : (rank + 1) * per_rank]


def one_pack() -> list:
    """All eight samples in one micro-batch."""
    return [collate(list(samples()))]


def start_full_stage(engine, train: TrainConfig, lr: float = 1e-3) -> None:
    """Start a one-step stage that trains everything at `lr`, as both engines' tests do."""

    def groups(module):
        set_trainable(module, ["*"])
        return param_groups(module, StageConfig(name="all", steps=1), {}, train)

    engine.start_stage(groups, 0)
    engine.set_lrs({g["name"]: lr for g in engine.param_groups()})
