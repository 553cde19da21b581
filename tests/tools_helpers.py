"""Builders shared by the tools' tests: a small random VLM, a run folder with its checkpoint, image files, shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf

from vlm_train.model import VLM, LLMConfig, ModelConfig, VisionConfig
from vlm_train.train.checkpoint import Checkpointer
from vlm_train.train.config import CheckpointConfig, Config

from helpers import encoder, noise_image, tiny_tokenizer

SMALL = ModelConfig(
    vision=VisionConfig(hidden_size=32, num_heads=2, intermediate_size=48),
    llm=LLMConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        mrope_section=[2, 3, 3],
        tie_word_embeddings=False,
    ),
    attn_backend="sdpa",
)


def small_model(seed: int = 0, scale: float = 0.3) -> VLM:
    """A random VLM whose weights are pushed well away from their init, so answers differ from prompt to prompt."""
    torch.manual_seed(seed)
    model = VLM(SMALL, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def save_run(run: Path, model: VLM, step: int = 5, **data: object) -> Path:
    """A run folder with one checkpoint of `model`, as the trainer writes it; returns the checkpoint folder."""
    config = Config(model=model.cfg)
    for key, value in data.items():
        setattr(config.data, key, value)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    return Checkpointer(run, CheckpointConfig(keep_last=0)).save(step, model, config_yaml, tiny_tokenizer())


def image_file(folder: Path, name: str, width: int, height: int, seed: int) -> str:
    path = folder / name
    noise_image(width, height, seed).save(path)
    return str(path)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, captions: list[str], boxes: list[tuple[str, list[float]]], seed: int = 0) -> str:
    """A webdataset shard of caption samples (png + txt) and grounding samples (png + json, normalized boxes)."""
    with wds.TarWriter(str(path)) as writer:
        for i, caption in enumerate(captions):
            image = noise_image(56 + 14 * (i % 3), 70, seed + i)
            writer.write({"__key__": f"cap{i:03d}", "png": _png(image), "txt": caption})
        for i, (phrase, box) in enumerate(boxes):
            image = noise_image(84, 56 + 14 * (i % 2), seed + 100 + i)
            record = {"phrase": phrase, "box": box, "box_format": "normalized"}
            writer.write({"__key__": f"box{i:03d}", "png": _png(image), "json": json.dumps(record)})
    return str(path)
