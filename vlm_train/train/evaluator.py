"""Held-out evaluation, every `eval.interval` steps, at stage ends and after training (and by tools/evaluate.py).

Loss: the mean token cross-entropy of the first `eval.num_loss` samples of each held-out set, teacher forced,
overall and per set (source) and task. Scores: caption exact match and grounding accuracy (IoU >= 0.5 of the parsed
000-999 box) from greedy answers to the first `num_caption` / `num_grounding` samples. Samples are read from the
shards once, when first needed, and reused on every call. The model's train/eval mode is restored. Under
DeepSpeed ZeRO-3 call it on every rank (the forward passes gather parameters collectively): every rank evaluates
the same samples, so the figures are the same on every rank. The result also carries small pictures of the first
`eval.table_examples` examples (made once), which `table_rows` pairs with their predictions for a W&B table.

    evaluator = HeldoutEvaluator({"heldout": urls}, encoder, cfg.eval, cfg.data.image.max_decode_pixels)
    result = evaluator.evaluate(model, device)  # result.metrics: {"heldout_loss": ..., "heldout_exact_match": ...}
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import DEFAULT_FACTOR, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample
from vlm_train.data.grounding import box_iou, parse_box
from vlm_train.data.loader import iter_samples, pack_for_generation
from vlm_train.data.video import VideoConfig
from vlm_train.devices import inference_autocast
from vlm_train.jsonio import dumps
from vlm_train.model.generate import greedy_generate
from vlm_train.model.vlm import VLM
from vlm_train.train import loss as L
from vlm_train.train.caption_attributes import ATTRIBUTES, attribute_scores
from vlm_train.train.config import EvalConfig

DEFAULT_SET = "heldout"
IOU_THRESHOLD = 0.5
PREDICTIONS_FILE = "heldout_predictions.jsonl"
SCORES = (("caption", "heldout_exact_match"), ("grounding", "heldout_grounding_acc"))
PICTURE_HEIGHT = 224  # pictures taller than this are scaled down to it
PICTURE_TILES = 8  # images and video frames side by side in one picture, at most


@dataclass
class Prediction:
    key: str
    task: str
    image: str  # what the image is, for people reading the examples: its size
    prompt: str
    expected: str
    generated: str
    correct: bool


@dataclass
class HeldoutResult:
    metrics: dict[str, float | None]  # a score with no samples is None
    predictions: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0
    # uint8 [H, W, 3] pictures of the first predictions' samples (eval.table_examples; None: a sample without one)
    pictures: list[np.ndarray | None] = field(default_factory=list)


def picture(sample: Sample, height: int = PICTURE_HEIGHT, max_tiles: int = PICTURE_TILES) -> np.ndarray | None:
    """What a reader of the examples sees of a sample, uint8 [H, W, 3]: its images, then each video's frames (a
    longer video: evenly spaced ones), side by side at the height of the tallest (at most `height`), at most
    `max_tiles` of them; None for a sample without either."""
    tiles = [np.asarray(image.convert("RGB")) for image in sample.images]
    for video in sample.videos:
        count = min(len(video.frames), max(max_tiles - len(tiles), 1))
        tiles += [video.frames[int(i)] for i in np.linspace(0, len(video.frames) - 1, count).round()]
    tiles = tiles[:max_tiles]
    if not tiles:
        return None
    tall = min(max(tile.shape[0] for tile in tiles), height)
    resized = [
        tile
        if tile.shape[0] == tall
        else np.asarray(Image.fromarray(tile).resize((max(round(tile.shape[1] * tall / tile.shape[0]), 1), tall)))
        for tile in tiles
    ]
    return np.concatenate(resized, axis=1)


def table_rows(result: HeldoutResult) -> list[dict[str, Any]]:
    """The examples that have pictures as rows of metrics.EXAMPLE_COLUMNS, for MetricsLogger.log_examples."""
    return [
        {
            "image": image,
            "prompt": p.prompt.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip(),
            "prediction": p.generated,
            "reference": p.expected,
            "correct": p.correct,
            "task": p.task,
        }
        for p, image in zip(result.predictions, result.pictures)
    ]


def _check_urls(sets: Mapping[str, list[str]]) -> None:
    for name, urls in sets.items():
        if not urls:
            raise ValueError(f"held-out set {name!r} has no shards")
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"held-out set {name!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}")


def loss_packs(encoded: list[EncodedSample], tokens_per_pack: int) -> Iterator[PackedBatch]:
    """Samples in order, in packs of at most `tokens_per_pack` tokens (a longer sample gets a pack of its own)."""
    pack: list[EncodedSample] = []
    tokens = 0
    for sample in encoded:
        if pack and tokens + sample.num_tokens > tokens_per_pack:
            yield collate(pack)
            pack, tokens = [], 0
        pack.append(sample)
        tokens += sample.num_tokens
    if pack:
        yield collate(pack)


@torch.no_grad()
def heldout_loss(model: VLM, packs: list[PackedBatch], device: torch.device) -> dict[str, float | None]:
    """Mean token cross-entropy over all packs, and per source and per task (keys heldout_loss[/source|task/x])."""
    by: dict[str, dict[str, tuple[float, int]]] = {"source": {}, "task": {}}
    for pack in packs:
        pack = pack.to(device)
        with inference_autocast(device, model):
            hidden = model(pack, return_logits=False).hidden
            token_losses = L.token_cross_entropy(hidden, pack.labels, head=model.llm.lm_head)
        for field_name, sums in by.items():
            for key, (total, count) in L.loss_sums_by(pack, token_losses, field_name).items():
                old_total, old_count = sums.get(key, (0.0, 0))
                sums[key] = (old_total + total, old_count + count)
    total = sum(t for t, _ in by["source"].values())
    count = sum(n for _, n in by["source"].values())
    metrics: dict[str, float | None] = {"heldout_loss": total / count if count else None}
    metrics["heldout_loss_tokens"] = float(count)
    for field_name, sums in by.items():
        for key, (t, n) in sorted(sums.items()):
            if n:
                metrics[f"heldout_loss/{field_name}/{key}"] = t / n
    return metrics


def _is_correct(sample: Sample, generated: str) -> bool:
    if sample.task == "grounding":
        box = parse_box(generated)
        return box is not None and box_iou(box, sample.meta["box"]) >= IOU_THRESHOLD
    return generated.strip() == sample.meta["answer"]


def select_heldout(
    urls: list[str],
    cfg: EvalConfig,
    max_decode_pixels: int,
    *,
    video: VideoConfig | None = None,
    factor: int = DEFAULT_FACTOR,
) -> list[Sample]:
    """The first num_caption caption and num_grounding grounding samples of the held-out shards (videos sampled by
    `video`, data.video, resized to multiples of `factor`)."""
    wanted = {"caption": cfg.num_caption, "grounding": cfg.num_grounding}
    chosen: list[Sample] = []
    if not any(wanted.values()):
        return chosen
    for sample in iter_samples(urls, "heldout", max_decode_pixels, video=video, factor=factor):
        if wanted.get(sample.task, 0) > 0:
            wanted[sample.task] -= 1
            chosen.append(sample)
        if not any(wanted.values()):
            break
    return chosen


@torch.no_grad()
def predict(
    model: VLM, encoder: Encoder, samples: list[Sample], cfg: EvalConfig, device: torch.device
) -> list[Prediction]:
    """Greedy answers for held-out samples, in packs of `prompts_per_pack` prompts."""
    tokenizer = encoder.tokenizer
    predictions = []
    it = iter(samples)
    while chunk := list(itertools.islice(it, max(cfg.prompts_per_pack, 1))):
        prompts = pack_for_generation(encoder, chunk).to(device)
        with inference_autocast(device, model):
            outputs = greedy_generate(model, prompts, cfg.max_new_tokens, encoder.special.im_end)
        for sample, tokens in zip(chunk, outputs):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            media = [f"{im.width}x{im.height} px" for im in sample.images]
            media += [
                f"video {v.frames.shape[0]} frames of {v.frames.shape[2]}x{v.frames.shape[1]} px" for v in sample.videos
            ]
            image = ", ".join(media) or "no image"
            prompt = sample.turns[-2].text if len(sample.turns) > 1 else ""
            correct = _is_correct(sample, text)
            predictions.append(Prediction(sample.key, sample.task, image, prompt, sample.meta["answer"], text, correct))
    return predictions


def score(predictions: list[Prediction]) -> dict[str, float | None]:
    """heldout_exact_match over caption samples and heldout_grounding_acc over grounding samples (None: none);
    for captions of the built-in synthetic sets, also per-attribute accuracies (colour, shape, direction, count)."""
    result: dict[str, float | None] = {}
    for task, name in SCORES:
        scored = [p.correct for p in predictions if p.task == task]
        result[name] = sum(scored) / len(scored) if scored else None
        result[f"{name}_n"] = len(scored)
    result.update(attribute_scores((p.expected, p.generated) for p in predictions if p.task == "caption"))
    return result


class HeldoutEvaluator:
    """Held-out loss per set (source) and task, plus caption / grounding scores, on samples chosen once."""

    def __init__(
        self,
        sets: Mapping[str, list[str]] | list[str],
        encoder: Encoder,
        cfg: EvalConfig,
        max_decode_pixels: int,
        video: VideoConfig | None = None,
    ) -> None:
        self.sets = {DEFAULT_SET: list(sets)} if isinstance(sets, list) else {k: list(v) for k, v in sets.items()}
        if not self.sets:
            raise ValueError("no held-out sets: give at least one list of shard URLs")
        _check_urls(self.sets)
        if cfg.num_loss < 0 or cfg.tokens_per_pack <= 0:
            raise ValueError(
                f"eval.num_loss must be >= 0 and eval.tokens_per_pack > 0, got {cfg.num_loss}, {cfg.tokens_per_pack}"
            )
        self.encoder = encoder
        self.cfg = cfg
        self.max_decode_pixels = max_decode_pixels
        # held-out videos are sampled as training samples them (data.video; None: its defaults), at the model's factor
        self.video = video
        self.factor = encoder.spec.patch_size * encoder.spec.merge_size
        self.skipped = 0  # held-out samples that could not be encoded (counted, not fatal)
        self._packs: list[PackedBatch] | None = None
        self._task_samples: list[Sample] | None = None
        self._pictures: list[np.ndarray | None] | None = None

    @classmethod
    def from_setup(
        cls, setup: Any, cfg: EvalConfig, max_decode_pixels: int, video: VideoConfig | None = None
    ) -> HeldoutEvaluator:
        """From the trainer's DataSetup: its encoder and held-out shards (one set, "heldout")."""
        return cls({DEFAULT_SET: list(setup.heldout_urls)}, setup.encoder, cfg, max_decode_pixels, video)

    def loss_packs(self) -> list[PackedBatch]:
        """The packs the loss runs on: the first num_loss samples of every set, encoded without jitter."""
        if self._packs is None:
            encoded = []
            for name, urls in self.sets.items():
                taken = 0
                for sample in iter_samples(urls, name, self.max_decode_pixels, video=self.video, factor=self.factor):
                    if taken >= self.cfg.num_loss:
                        break
                    try:
                        encoded.append(self.encoder.encode(sample))
                    except SkipSample:
                        self.skipped += 1
                        continue
                    taken += 1
            self._packs = list(loss_packs(encoded, self.cfg.tokens_per_pack))
        return self._packs

    def task_samples(self) -> list[Sample]:
        """Caption and grounding samples to answer, taken across all sets."""
        if self._task_samples is None:
            urls = [u for urls in self.sets.values() for u in urls]
            self._task_samples = select_heldout(
                urls, self.cfg, self.max_decode_pixels, video=self.video, factor=self.factor
            )
        return self._task_samples

    def pictures(self) -> list[np.ndarray | None]:
        """Pictures of the first `table_examples` task samples, made once: small next to the samples themselves."""
        if self._pictures is None:
            self._pictures = [picture(sample) for sample in self.task_samples()[: max(self.cfg.table_examples, 0)]]
        return self._pictures

    def evaluate(self, model: VLM, device: torch.device) -> HeldoutResult:
        """Loss and scores of `model` (left in the train/eval mode it came in), with every prediction."""
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            metrics = heldout_loss(model, self.loss_packs(), device) if self.cfg.num_loss else {}
            predictions = predict(model, self.encoder, self.task_samples(), self.cfg, device)
        finally:
            model.train(was_training)
        metrics.update(score(predictions))
        metrics["heldout_skipped"] = float(self.skipped)
        return HeldoutResult(metrics, predictions, time.perf_counter() - started, self.pictures())

    def __call__(self, model: VLM, device: torch.device) -> dict[str, float | None]:
        return self.evaluate(model, device).metrics


def write_predictions(predictions: list[Prediction], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(dumps(asdict(p)) + "\n")


def _figure(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_report(result: HeldoutResult, show_examples: int) -> None:
    """A few held-out examples per task and the scores, on the console."""
    shown: list[Prediction] = []
    for task, _ in SCORES:
        shown += [p for p in result.predictions if p.task == task][: max(show_examples // 2, 1)]
    print("\nHeld-out examples:")
    for p in shown:
        mark = "ok " if p.correct else "MISS"
        prompt = p.prompt.replace("<image>", "").replace("<video>", "")
        print(f"  [{mark}] {p.task:9s} image {p.image:12s} | prompt: {prompt!r}")
        print(f"         expected: {p.expected!r}\n         generated: {p.generated!r}")
    m = result.metrics
    print(
        f"Held-out score: caption exact match {_figure(m.get('heldout_exact_match'))} "
        f"({m.get('heldout_exact_match_n', 0)} samples), grounding IoU>=0.5 accuracy "
        f"{_figure(m.get('heldout_grounding_acc'))} ({m.get('heldout_grounding_acc_n', 0)} samples), loss "
        f"{_figure(m.get('heldout_loss'))}, in {result.seconds:.1f}s"
    )
    per_object = [f"{a} {_figure(m[f'heldout_{a}_acc'])}" for a in ATTRIBUTES if f"heldout_{a}_acc" in m]
    if per_object:  # captions of the built-in synthetic sets
        print(
            f"Per object (left to right): {', '.join(per_object)}; "
            f"object count {_figure(m.get('heldout_object_count_acc'))}"
        )
    print()
