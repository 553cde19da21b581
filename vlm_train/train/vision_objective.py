"""The vision stage's objectives over the rows of a whole optimizer step, and which rows a pack gives.

- Sigmoid image-text contrastive, as SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training")
  and big_vision's `sigmoid_loss`: for normalised image and text embeddings x, y, logits t * x_i . y_j + b with a
  learned temperature t = exp(t') and bias b; loss = -sum_ij log sigmoid(z_ij * logit_ij) / n, z_ij = 1 for a
  matching pair and -1 otherwise, n the number of images. Every image of the step (all micro-batches, all ranks)
  is a negative for every other text.
- Multi-label: a per-label sigmoid (binary cross-entropy) of a linear classifier over the pooled image feature,
  summed over labels and averaged over the step's labelled images: the standard multi-label formulation (e.g.
  Ridnik et al. 2021, "Asymmetric Loss", with its focusing terms at 0). Labels come from the sample's JSON
  `labels` list, else from the vocabulary words found in its caption.

A pack's pairs are its samples with exactly one image and supervised text (a caption sample: the image and its
caption); its labelled images are the single images of samples that have labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlm_train.data.batch import PackedBatch
from vlm_train.model.vision_heads import image_samples, text_spans
from vlm_train.train.config import VisionPretrainConfig


class LabelVocabulary:
    """The labels of `vision_pretrain.labels`, and a sample's multi-hot target from its meta."""

    def __init__(self, labels: list[str]) -> None:
        if len(set(labels)) != len(labels):
            raise ValueError(f"vision_pretrain.labels has duplicates: {labels}")
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.patterns = [re.compile(rf"\b{re.escape(label)}\b", re.IGNORECASE) for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def of(self, meta: dict[str, Any]) -> list[int] | None:
        """The label indices of a sample, or None if it has no labels to learn from."""
        if not self.labels:
            return None
        given = meta.get("labels")
        if isinstance(given, list):
            return sorted({self.index[str(label)] for label in given if str(label) in self.index})
        if meta.get("task") == "caption" and isinstance(meta.get("answer"), str):
            return [i for i, pattern in enumerate(self.patterns) if pattern.search(meta["answer"])]
        return None


@dataclass
class PackRows:
    """Which outputs of one pack enter the step's objectives (indices into VisionHeadsOutput's rows)."""

    pair_images: torch.Tensor  # long [n]: the image of each pair
    pair_texts: torch.Tensor  # long [n]: its text
    pair_samples: torch.Tensor  # long [n]: its sample
    label_images: torch.Tensor  # long [m]
    label_targets: torch.Tensor  # float [m, L], multi-hot


def pack_rows(pack: PackedBatch, image_token_id: int, vocab: LabelVocabulary) -> PackRows:
    """The pairs and labelled images of a pack (on the host, from its tokens and meta)."""
    samples = pack.num_samples
    owner = image_samples(pack.input_ids, pack.sample_index, image_token_id)
    images_per_sample = torch.bincount(owner, minlength=samples)
    _, text_counts = text_spans(pack.labels, pack.sample_index, samples)
    text_of_sample = torch.cumsum(text_counts > 0, 0) - 1
    image_of_sample = torch.full((samples,), -1, dtype=torch.long)
    image_of_sample[owner] = torch.arange(len(owner))  # read only for samples with one image
    single = images_per_sample == 1
    paired = torch.nonzero(single & (text_counts > 0)).flatten()
    label_images, targets = [], []
    meta = pack.meta or [{}] * samples
    for s in torch.nonzero(single).flatten().tolist():
        labels = vocab.of(meta[s])
        if labels is not None:
            label_images.append(int(image_of_sample[s]))
            row = torch.zeros(len(vocab))
            row[labels] = 1.0
            targets.append(row)
    return PackRows(
        pair_images=image_of_sample[paired],
        pair_texts=text_of_sample[paired],
        pair_samples=paired,
        label_images=torch.tensor(label_images, dtype=torch.long),
        label_targets=torch.stack(targets) if targets else torch.zeros(0, len(vocab)),
    )


def sigmoid_contrastive_loss(
    images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's loss over n pairs (row i of each is a pair), normalised by n as big_vision does."""
    images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
    logits = images @ texts.T * logit_scale.float().exp() + logit_bias.float()
    signs = 2 * torch.eye(len(images), device=images.device) - 1
    return -F.logsigmoid(signs * logits).sum() / len(images)


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per label, summed over labels, averaged over images."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return per_label.sum() / len(logits)


@dataclass
class StepRows:
    """The step's rows (of every micro-batch; gathered: of every rank) that the objectives read."""

    pair_images: torch.Tensor
    pair_texts: torch.Tensor
    label_logits: torch.Tensor
    label_targets: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor


def objective(rows: StepRows, cfg: VisionPretrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the enabled objectives, and its parts as metrics."""
    total = rows.logit_scale.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {
        "vision/pairs": float(len(rows.pair_images)),
        "vision/temperature": float(rows.logit_scale.detach().exp()),
        "vision/bias": float(rows.logit_bias.detach()),
    }
    if cfg.contrastive_weight > 0 and len(rows.pair_images):
        loss = sigmoid_contrastive_loss(rows.pair_images, rows.pair_texts, rows.logit_scale, rows.logit_bias)
        total = total + cfg.contrastive_weight * loss
        metrics["vision/contrastive_loss"] = float(loss.detach())
    if cfg.multilabel_weight > 0 and len(rows.label_logits):
        loss = multilabel_loss(rows.label_logits, rows.label_targets)
        total = total + cfg.multilabel_weight * loss
        metrics["vision/multilabel_loss"] = float(loss.detach())
        predicted = rows.label_logits.detach() > 0
        metrics["vision/label_exact"] = float((predicted == rows.label_targets.bool()).all(-1).float().mean())
    return total, metrics


def check_vision_pretrain(cfg: VisionPretrainConfig) -> None:
    if cfg.contrastive_weight < 0 or cfg.multilabel_weight < 0:
        raise ValueError("vision_pretrain.contrastive_weight and multilabel_weight must not be negative")
    if cfg.contrastive_weight == 0 and cfg.multilabel_weight == 0:
        raise ValueError(
            "a vision stage needs an objective: set vision_pretrain.contrastive_weight or multilabel_weight"
        )
    if cfg.multilabel_weight > 0 and not cfg.labels:
        raise ValueError("vision_pretrain.multilabel_weight > 0 needs a label vocabulary: vision_pretrain.labels")
