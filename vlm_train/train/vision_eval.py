"""Held-out figures of a vision stage: zero-shot image -> caption retrieval and multi-label accuracy.

Retrieval: every held-out caption sample's image is matched against all distinct held-out captions through the
text tower (cosine similarity of the embeddings); top-1 is right when the best caption is the image's own (an
identical caption of another image counts as right). Labels: a label is predicted when its logit is positive;
`label_exact` asks for the whole set, `label_acc` is the mean over labels of the per-label accuracy, and
`label_acc/<label>` each one. Under ZeRO-3, call it on every rank (the forward gathers weights collectively).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.data.loader import iter_samples
from vlm_train.devices import inference_autocast
from vlm_train.model.vision_heads import HEADS_ATTR
from vlm_train.model.vlm import VLM
from vlm_train.train.config import EvalConfig
from vlm_train.train.evaluator import loss_packs
from vlm_train.train.vision_objective import LabelVocabulary, pack_rows


def _texts(pack: PackedBatch, samples: torch.Tensor) -> list[tuple[int, ...]]:
    """The supervised tokens of each sample in `samples`, as a hashable text identity."""
    out = []
    for s in samples.tolist():
        mask = (pack.sample_index == s) & (pack.labels != IGNORE_INDEX)
        out.append(tuple(pack.labels[mask].tolist()))
    return out


class VisionEvaluator:
    """The first `eval.num_caption` caption samples of the held-out shards, encoded once, scored on each call."""

    def __init__(
        self, urls: list[str], encoder: Encoder, cfg: EvalConfig, max_decode_pixels: int, vocab: LabelVocabulary
    ) -> None:
        self.urls, self.encoder, self.cfg = list(urls), encoder, cfg
        self.max_decode_pixels, self.vocab = max_decode_pixels, vocab
        self.skipped = 0
        self._packs: list[PackedBatch] | None = None

    def packs(self) -> list[PackedBatch]:
        if self._packs is None:
            encoded = []
            for sample in iter_samples(self.urls, "heldout", self.max_decode_pixels):
                if len(encoded) >= self.cfg.num_caption:
                    break
                if sample.task != "caption" or len(sample.images) != 1:
                    continue
                try:
                    encoded.append(self.encoder.encode(sample))
                except SkipSample:
                    self.skipped += 1
            self._packs = list(loss_packs(encoded, self.cfg.tokens_per_pack))
        return self._packs

    @torch.no_grad()
    def evaluate(self, model: VLM, device: torch.device) -> dict[str, Any]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        images, texts, identities, logits, targets = [], [], [], [], []
        try:
            for pack in self.packs():
                rows = pack_rows(pack, self.encoder.special.image_pad, self.vocab)
                with inference_autocast(device, model):
                    out = model(pack.to(device), attachment=HEADS_ATTR)
                images.append(out.image_embeds[rows.pair_images.to(device)].float().cpu())
                texts.append(out.text_embeds[rows.pair_texts.to(device)].float().cpu())
                identities += _texts(pack, rows.pair_samples)
                if out.label_logits is not None:
                    logits.append(out.label_logits[rows.label_images.to(device)].float().cpu())
                    targets.append(rows.label_targets)
        finally:
            model.train(was_training)
        metrics: dict[str, Any] = {"vision/heldout_pairs": float(len(identities))}
        if identities:
            metrics["vision/heldout_retrieval_top1"] = _retrieval_top1(torch.cat(images), torch.cat(texts), identities)
        if logits and sum(len(t) for t in targets):
            metrics.update(_label_scores(torch.cat(logits), torch.cat(targets), self.vocab.labels))
        metrics["vision/heldout_seconds"] = time.perf_counter() - started
        return metrics


def _retrieval_top1(images: torch.Tensor, texts: torch.Tensor, identities: list[tuple[int, ...]]) -> float:
    distinct = {identity: i for i, identity in enumerate(identities)}  # one embedding per distinct caption
    choices = list(distinct.values())
    candidates = F.normalize(texts[choices], dim=-1)
    best = (F.normalize(images, dim=-1) @ candidates.T).argmax(-1)
    truth = torch.tensor([choices.index(distinct[identity]) for identity in identities])
    return float((best == truth).float().mean())


def _label_scores(logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, float]:
    predicted, truth = logits > 0, targets.bool()
    per_label = (predicted == truth).float().mean(0)
    scores = {
        "vision/heldout_label_exact": float((predicted == truth).all(-1).float().mean()),
        "vision/heldout_label_acc": float(per_label.mean()),
    }
    scores.update({f"vision/heldout_label_acc/{label}": float(a) for label, a in zip(labels, per_label)})
    return scores
