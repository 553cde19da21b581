"""Held-out evaluation: caption exact match and grounding accuracy (IoU >= 0.5) from greedy generations."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from vlm_train.data.encode import Encoder
from vlm_train.data.formats import Sample
from vlm_train.data.grounding import box_iou, parse_box
from vlm_train.data.loader import iter_samples, pack_for_generation
from vlm_train.model.generate import greedy_generate
from vlm_train.model.vlm import VLM
from vlm_train.train.config import EvalConfig

IOU_THRESHOLD = 0.5


@dataclass
class Prediction:
    key: str
    task: str
    image: str  # what the image is, for people reading the examples: its size
    prompt: str
    expected: str
    generated: str
    correct: bool


def _is_correct(sample: Sample, generated: str) -> bool:
    if sample.task == "grounding":
        box = parse_box(generated)
        return box is not None and box_iou(box, sample.meta["box"]) >= IOU_THRESHOLD
    return generated.strip() == sample.meta["answer"]


def select_heldout(urls: list[str], cfg: EvalConfig, max_decode_pixels: int) -> list[Sample]:
    """The first num_caption caption and num_grounding grounding samples of the held-out shards."""
    wanted = {"caption": cfg.num_caption, "grounding": cfg.num_grounding}
    chosen: list[Sample] = []
    for sample in iter_samples(urls, "heldout", max_decode_pixels):
        if wanted.get(sample.task, 0) > 0:
            wanted[sample.task] -= 1
            chosen.append(sample)
        if not any(wanted.values()):
            break
    return chosen


def predict(model: VLM, encoder: Encoder, samples: list[Sample], cfg: EvalConfig, device: torch.device) -> list[Prediction]:
    """Greedy answers for held-out samples, in packs of `prompts_per_pack` prompts."""
    was_training = model.training
    model.eval()
    tokenizer = encoder.tokenizer
    predictions = []
    it = iter(samples)
    while chunk := list(itertools.islice(it, max(cfg.prompts_per_pack, 1))):
        prompts = pack_for_generation(encoder, chunk).to(device)
        outputs = greedy_generate(model, prompts, cfg.max_new_tokens, encoder.special.im_end)
        for sample, tokens in zip(chunk, outputs):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            image = ", ".join(f"{im.width}x{im.height} px" for im in sample.images) or "no image"
            prompt = sample.turns[-2].text if len(sample.turns) > 1 else ""
            correct = _is_correct(sample, text)
            predictions.append(Prediction(sample.key, sample.task, image, prompt, sample.meta["answer"], text, correct))
    model.train(was_training)
    return predictions


def score(predictions: list[Prediction]) -> dict[str, float]:
    """heldout_exact_match over caption samples and heldout_grounding_acc over grounding samples."""
    result = {}
    for task, name in (("caption", "heldout_exact_match"), ("grounding", "heldout_grounding_acc")):
        scored = [p.correct for p in predictions if p.task == task]
        result[name] = sum(scored) / len(scored) if scored else float("nan")
        result[f"{name}_n"] = len(scored)
    return result
