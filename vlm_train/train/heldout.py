"""Held-out evaluation, after training or every few steps during it: loss per source and task, and task scores.

Loss is the mean token cross-entropy of the first `num_loss_samples` samples of each held-out set, teacher
forced. Scores are caption exact match and grounding accuracy (IoU >= 0.5 of the parsed 000-999 box) from greedy
answers (see evaluate.py). Samples are read from the shards once, when first needed, and reused on every call.

    evaluator = HeldoutEvaluator({"heldout": urls}, encoder, cfg.eval, cfg.data.image.max_decode_pixels)
    metrics = evaluator(model, device)  # {"heldout_loss": ..., "heldout_exact_match": ..., ...}
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import Sample
from vlm_train.data.loader import iter_samples
from vlm_train.model.vlm import VLM
from vlm_train.train import loss as L
from vlm_train.train.config import EvalConfig
from vlm_train.train.evaluate import Prediction, predict, score, select_heldout

DEFAULT_SET = "heldout"


@dataclass
class HeldoutResult:
    metrics: dict[str, float]
    predictions: list[Prediction] = field(default_factory=list)


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
def heldout_loss(model: VLM, packs: list[PackedBatch], device: torch.device) -> dict[str, float]:
    """Mean token cross-entropy over all packs, and per source and per task (keys heldout_loss[/source|task/x])."""
    was_training = model.training
    model.eval()
    by: dict[str, dict[str, tuple[float, int]]] = {"source": {}, "task": {}}
    for pack in packs:
        pack = pack.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(pack, return_logits=False).hidden
            token_losses = L.token_cross_entropy(hidden, pack.labels, head=model.llm.lm_head)
        for field_name, sums in by.items():
            for key, (total, count) in L.loss_sums_by(pack, token_losses, field_name).items():
                old_total, old_count = sums.get(key, (0.0, 0))
                sums[key] = (old_total + total, old_count + count)
    model.train(was_training)
    total = sum(t for t, _ in by["source"].values())
    count = sum(n for _, n in by["source"].values())
    metrics = {"heldout_loss": total / count if count else float("nan"), "heldout_loss_tokens": float(count)}
    for field_name, sums in by.items():
        for key, (t, n) in sorted(sums.items()):
            if n:
                metrics[f"heldout_loss/{field_name}/{key}"] = t / n
    return metrics


class HeldoutEvaluator:
    """Held-out loss per set (source) and task, plus caption / grounding scores, on samples chosen once."""

    def __init__(
        self,
        sets: Mapping[str, list[str]] | list[str],
        encoder: Encoder,
        cfg: EvalConfig,
        max_decode_pixels: int,
        num_loss_samples: int = 64,
        tokens_per_pack: int = 4096,
    ) -> None:
        self.sets = {DEFAULT_SET: list(sets)} if isinstance(sets, list) else {k: list(v) for k, v in sets.items()}
        if not self.sets:
            raise ValueError("no held-out sets: give at least one list of shard URLs")
        _check_urls(self.sets)
        if num_loss_samples < 0 or tokens_per_pack <= 0:
            raise ValueError(
                f"num_loss_samples must be >= 0 and tokens_per_pack > 0, got {num_loss_samples}, {tokens_per_pack}"
            )
        self.encoder = encoder
        self.cfg = cfg
        self.max_decode_pixels = max_decode_pixels
        self.num_loss_samples = num_loss_samples
        self.tokens_per_pack = tokens_per_pack
        self.skipped = 0  # held-out samples that could not be encoded (counted, not fatal)
        self._packs: list[PackedBatch] | None = None
        self._task_samples: list[Sample] | None = None

    @classmethod
    def from_setup(cls, setup: Any, cfg: EvalConfig, max_decode_pixels: int, **kwargs: Any) -> HeldoutEvaluator:
        """From the trainer's DataSetup (its encoder and heldout_urls)."""
        return cls(list(setup.heldout_urls), setup.encoder, cfg, max_decode_pixels, **kwargs)

    def loss_packs(self) -> list[PackedBatch]:
        """The packs the loss runs on: the first num_loss_samples samples of every set, encoded without jitter."""
        if self._packs is None:
            encoded = []
            for name, urls in self.sets.items():
                taken = 0
                for sample in iter_samples(urls, name, self.max_decode_pixels):
                    if taken >= self.num_loss_samples:
                        break
                    try:
                        encoded.append(self.encoder.encode(sample))
                    except SkipSample:
                        self.skipped += 1
                        continue
                    taken += 1
            self._packs = list(loss_packs(encoded, self.tokens_per_pack))
        return self._packs

    def task_samples(self) -> list[Sample]:
        """Caption and grounding samples to answer, taken across all sets (evaluate.select_heldout)."""
        if self._task_samples is None:
            urls = [u for urls in self.sets.values() for u in urls]
            self._task_samples = select_heldout(urls, self.cfg, self.max_decode_pixels)
        return self._task_samples

    def evaluate(self, model: VLM, device: torch.device) -> HeldoutResult:
        """Loss and scores of `model` (left in the train/eval mode it came in), with every prediction."""
        metrics = heldout_loss(model, self.loss_packs(), device) if self.num_loss_samples else {}
        predictions: list[Prediction] = []
        samples = self.task_samples()
        if samples:
            predictions = predict(model, self.encoder, samples, self.cfg, device)
            metrics.update({k: float(v) for k, v in score(predictions).items()})
        metrics["heldout_skipped"] = float(self.skipped)
        return HeldoutResult(metrics, predictions)

    def __call__(self, model: VLM, device: torch.device) -> dict[str, float]:
        return self.evaluate(model, device).metrics
