"""One optimizer step of a vision stage: the objectives see every pair of the step at once, yet each micro-batch
runs backward on its own (GradCache, Gao et al. 2021).

1. Each micro-batch runs forward (without a graph when there are several) and keeps its rows: paired image and
   text embeddings, label logits, temperature and bias.
2. The rows of every rank are gathered; every rank computes the same objective over all of them, with the rows as
   leaf tensors, and takes the gradient of the loss with respect to its own rows.
3. Each micro-batch runs forward again (with one micro-batch, the first forward's graph is kept instead) and
   backward from sum(rows * their gradient): exactly its share of the gradient of the step's loss. The temperature
   and bias, the same on every rank, get their gradient once, from rank 0's first micro-batch.

So the loss and the gradients do not change with the number of micro-batches or ranks (negatives come from all
ranks), and memory holds one micro-batch's activations.
"""

from __future__ import annotations

import contextlib

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.model.vision_heads import HEADS_ATTR, VisionHeadsOutput
from vlm_train.train import distributed as D
from vlm_train.train.config import VisionPretrainConfig
from vlm_train.train.engines import Engine
from vlm_train.train.guards import StepFaults
from vlm_train.train.step import NO_FAULTS, StepResult
from vlm_train.train.vision_objective import LabelVocabulary, PackRows, StepRows, objective, pack_rows


def _select(out: VisionHeadsOutput, rows: PackRows) -> list[torch.Tensor]:
    device = out.image_embeds.device
    label_logits = out.label_logits if out.label_logits is not None else out.image_embeds.new_zeros(0, 0)
    labels = rows.label_images.to(device) if out.label_logits is not None else rows.label_images[:0].to(device)
    return [
        out.image_embeds[rows.pair_images.to(device)],
        out.text_embeds[rows.pair_texts.to(device)],
        label_logits[labels],
    ]


def vision_forward_backward(
    engine: Engine,
    packs: list[PackedBatch],
    cfg: VisionPretrainConfig,
    vocab: LabelVocabulary,
    image_token_id: int,
    rank: int,
    world_size: int,
    faults: StepFaults = NO_FAULTS,
) -> StepResult:
    """Forward and backward of this rank's micro-batches under the step's objectives; see the module docstring."""
    module, device = engine.forward_module(), engine.device
    keep_graph = len(packs) == 1
    moved, selected, outputs, firsts = [], [], [], []
    for pack in packs:
        rows = pack_rows(pack, image_token_id, vocab)
        batch = pack.to(device, non_blocking=True)
        with contextlib.nullcontext() if keep_graph else torch.no_grad(), engine.autocast():
            out = module(batch, attachment=HEADS_ATTR)
        moved.append(batch)
        selected.append(rows)
        outputs.append(out)
        firsts.append(_select(out, rows))
    local = [torch.cat([f[i].detach().float() for f in firsts]) for i in range(3)]
    targets = torch.cat([r.label_targets for r in selected]).to(device)
    if outputs[0].label_logits is None:
        targets = targets[:0]
    (images, texts, logits, targets), starts = D.all_gather_rows([*local, targets])
    leaves = [t.clone().requires_grad_(True) for t in (images, texts, logits)]
    scale = outputs[0].logit_scale.detach().float().clone().requires_grad_(True)
    bias = outputs[0].logit_bias.detach().float().clone().requires_grad_(True)
    loss, metrics = objective(StepRows(*leaves, targets, scale, bias), cfg)
    loss = faults.loss(loss)  # a NaN on one rank reaches every rank's update through finish_step's sum
    grads = torch.autograd.grad(loss, [*leaves, scale, bias], allow_unused=True, materialize_grads=True)
    row_grads, scale_grad, bias_grad = grads[:3], grads[3], grads[4]

    offsets = list(starts)
    for index, (batch, rows, out, first) in enumerate(zip(moved, selected, outputs, firsts)):
        if not keep_graph:
            with engine.autocast():
                out = module(batch, attachment=HEADS_ATTR)
            first = _select(out, rows)
        surrogate = out.anchor.float()
        for i, part in enumerate(first):
            grad = row_grads[i][offsets[i] : offsets[i] + len(part)]
            offsets[i] += len(part)
            surrogate = surrogate + (part.float() * grad).sum()
        owner = rank == 0 and index == 0
        surrogate = surrogate + (out.logit_scale.float() * (scale_grad if owner else 0.0)).sum()
        surrogate = surrogate + (out.logit_bias.float() * (bias_grad if owner else 0.0)).sum()
        engine.backward(surrogate)
    # Every rank computed the whole loss; finish_step sums the ranks' shares.
    result = StepResult(loss=float(loss.detach()) / world_size)
    result.extra = metrics
    return result
