"""Held-out evaluation: caption exact match and grounding accuracy (IoU >= 0.5) from greedy generations."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm_train.data.encode import Encoder
from vlm_train.data.formats import Sample
from vlm_train.data.grounding import box_iou, parse_box
from vlm_train.data.loader import iter_samples, pack_for_generation
from vlm_train.model.generate import greedy_generate
from vlm_train.model.vlm import VLM
from vlm_train.train.config import Config, EvalConfig

if TYPE_CHECKING:
    from vlm_train.train.builders import DataSetup

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


def predict(
    model: VLM, encoder: Encoder, samples: list[Sample], cfg: EvalConfig, device: torch.device
) -> list[Prediction]:
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


def evaluate_and_report(
    model: VLM, setup: DataSetup, cfg: Config, device: torch.device, run_dir: Path
) -> dict[str, Any]:
    """Score the held-out split, print a few examples, and keep every prediction in heldout_predictions.jsonl."""
    started = time.perf_counter()
    samples = select_heldout(setup.heldout_urls, cfg.eval, cfg.data.image.max_decode_pixels)
    predictions = predict(model, setup.encoder, samples, cfg.eval, device)
    scores = score(predictions)
    with open(run_dir / "heldout_predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p.__dict__) + "\n")
    shown: list = []
    for task in ("caption", "grounding"):
        shown += [p for p in predictions if p.task == task][: max(cfg.eval.show_examples // 2, 1)]
    print("\nHeld-out examples:")
    for p in shown:
        mark = "ok " if p.correct else "MISS"
        print(f"  [{mark}] {p.task:9s} image {p.image:12s} | prompt: {p.prompt.replace('<image>', '')!r}")
        print(f"         expected: {p.expected!r}\n         generated: {p.generated!r}")
    print(
        f"Held-out score: caption exact match {scores['heldout_exact_match']:.3f} "
        f"({scores['heldout_exact_match_n']} samples), grounding IoU>=0.5 accuracy "
        f"{scores['heldout_grounding_acc']:.3f} ({scores['heldout_grounding_acc_n']} samples), "
        f"in {time.perf_counter() - started:.1f}s\n"
    )
    return scores
