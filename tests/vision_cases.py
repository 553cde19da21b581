"""The fixed model with vision heads, samples and packs that the vision-stage tests split over micro-batches and
ranks (tests/test_vision_stage.py, tests/vision_worker.py)."""

from __future__ import annotations

import functools

import torch

from vlm_train.data.collate import collate
from vlm_train.data.encode import EncodedSample
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.model import VLM, ModelConfig
from vlm_train.model.vision_heads import VisionHeads, VisionHeadsConfig, attach_heads
from vlm_train.train.config import StageConfig, TrainConfig, VisionPretrainConfig
from vlm_train.train.curriculum import param_groups
from vlm_train.train.kinds import stage_kind
from vlm_train.train.vision_objective import LabelVocabulary

from helpers import encoder, noise_image, tiny_tokenizer

LABELS = ["red", "blue", "green", "square", "ring"]
CAPTIONS = ["a red square", "a blue ring and a green square", "a green ring", "a blue square", "a red ring"]
STAGE = StageConfig(name="vision", kind="vision", steps=1, trainable=["vision.*"])


def objective_config(pooling: str = "map", text_tower: str = "small") -> VisionPretrainConfig:
    heads = VisionHeadsConfig(pooling=pooling, text_tower=text_tower, embed_dim=16, text_hidden_size=32, text_layers=1)
    return VisionPretrainConfig(heads=heads, contrastive_weight=1.0, multilabel_weight=0.5, labels=list(LABELS))


def make_model(pooling: str = "map", text_tower: str = "small") -> VLM:
    torch.manual_seed(0)
    cfg = ModelConfig(attn_backend="sdpa")
    cfg.llm.num_layers = 1
    vocab = len(tiny_tokenizer())
    model = VLM(cfg, vocab_size=vocab, image_token_id=encoder().special.image_pad)
    heads_cfg = objective_config(pooling, text_tower).heads
    heads = VisionHeads(heads_cfg, cfg.vision.hidden_size, cfg.llm.hidden_size, vocab, len(LABELS), "sdpa")
    attach_heads(model, heads)
    return model


def vocabulary() -> LabelVocabulary:
    return LabelVocabulary(LABELS)


def caption_sample(key: str, caption: str, seed: int, images: int = 1) -> Sample:
    pictures = [
        noise_image(56 + 28 * ((seed + i) % 3), 56 + 28 * ((seed + 2 * i) % 2), seed + i) for i in range(images)
    ]
    turns = [Turn("user", IMAGE_PLACEHOLDER * images + "Describe the image."), Turn("assistant", caption)]
    return Sample(key, "test", "caption", pictures, turns, {"answer": caption})


@functools.lru_cache(maxsize=1)
def samples() -> tuple[EncodedSample, ...]:
    """Eight caption samples of one image, a text-only sample and a sample of two images (neither pairs)."""
    enc = encoder()
    out = [enc.encode(caption_sample(f"c{i}", CAPTIONS[i % len(CAPTIONS)], seed=i)) for i in range(8)]
    text_only = Sample("t", "test", "text", [], [Turn("text", "a red square")], {"answer": "a red square"})
    out.insert(3, enc.encode(text_only))
    out.insert(6, enc.encode(caption_sample("two", "a red ring", seed=20, images=2)))
    return tuple(out)


def all_packs() -> list:
    """Four micro-batches of the step."""
    s = samples()
    return [collate(list(s[i : i + 3])) for i in range(0, 9, 3)] + [collate(list(s[9:]))]


def one_pack() -> list:
    return [collate(list(samples()))]


def start_vision_stage(engine, train: TrainConfig, lr: float = 1e-3) -> None:
    def groups(module):
        stage_kind("vision").set_trainable(module, STAGE)
        return param_groups(module, STAGE, {}, train)

    engine.start_stage(groups, 0)
    engine.set_lrs({g["name"]: lr for g in engine.param_groups()})
