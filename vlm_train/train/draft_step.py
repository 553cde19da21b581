"""One optimizer step of a draft stage: the frozen target's features for every micro-batch first (run in the loop,
or read from the pack offline), then the step's normaliser per TTT step all-reduced, then forward and backward of
the draft per micro-batch.

Step j's loss is the soft cross-entropy summed over the positions it supervises on every micro-batch and rank,
divided by their number, so accumulation and world size do not change it; the step's loss is
sum_j step_weight**j * loss_j. Per TTT step it logs the loss and the accuracy (the draft's argmax is the target's),
and the simulated acceptance length sum_k prod_{j<=k} acc_j.
"""

from __future__ import annotations

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.model.draft import DRAFT_ATTR, DraftInputs, DraftOutput, draft_of
from vlm_train.train import distributed as D
from vlm_train.train.config import Eagle3Config
from vlm_train.train.draft_objective import (
    TargetFeatures,
    step_masks,
    stored_features,
    target_distribution,
    target_features,
)
from vlm_train.train.engines import Engine
from vlm_train.train.guards import StepFaults
from vlm_train.train.step import NO_FAULTS, StepResult


def pack_inputs(model: torch.nn.Module, batch: PackedBatch, cfg: Eagle3Config) -> DraftInputs:
    """The draft's inputs for one pack on the device: the target's features (online or stored) and targets."""
    draft = draft_of(model)
    assert draft is not None, "the model has no draft attached"
    if cfg.offline:
        features = stored_features(batch)
    else:
        features = target_features(model, batch, draft.target_layers, cfg.hidden_dtype)
    return features_to_inputs(features, model.llm.lm_head.weight, draft, batch, cfg.ttt_steps)


def features_to_inputs(
    features: TargetFeatures, head_weight: torch.Tensor, draft: torch.nn.Module, batch: PackedBatch, steps: int
) -> DraftInputs:
    logits, in_vocab = target_distribution(features.final, head_weight, draft)
    return DraftInputs(features.aux, logits, step_masks(batch, in_vocab, steps))


def simulated_acceptance(accuracies: list[float]) -> float:
    """sum over k of the product of the step accuracies up to k: the expected accepted draft tokens of a chain
    (one more, the target's own, comes with every verification)."""
    total, running = 0.0, 1.0
    for acc in accuracies:
        running *= acc
        total += running
    return total


def draft_forward_backward(
    engine: Engine,
    packs: list[PackedBatch],
    cfg: Eagle3Config,
    faults: StepFaults = NO_FAULTS,
) -> StepResult:
    """Forward and backward of this rank's micro-batches of a draft stage; see the module docstring."""
    module, device, model = engine.forward_module(), engine.device, engine.model
    moved, inputs = [], []
    for pack in packs:
        batch = pack.to(device, non_blocking=True)
        with engine.autocast():
            inputs.append(pack_inputs(model, batch, cfg))
        moved.append(batch)
    steps = cfg.ttt_steps
    counts = torch.zeros(steps, dtype=torch.float64, device=device)
    for item in inputs:
        counts += item.masks.sum(1).double()
    counts = D.all_reduce(counts)
    weights = torch.tensor([cfg.step_weight**j for j in range(steps)], dtype=torch.float64, device=device)
    scale = (weights / counts.clamp(min=1)).float()
    loss_sums = torch.zeros(steps, dtype=torch.float64, device=device)
    correct = torch.zeros(steps, dtype=torch.float64, device=device)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch, item in zip(moved, inputs):
        with engine.autocast():
            out: DraftOutput = module(batch, attachment=DRAFT_ATTR, inputs=item)
        micro = faults.loss((out.loss_sums.float() * scale).sum())
        engine.backward(micro)
        step_loss += micro.detach().double()
        loss_sums += out.loss_sums.detach().double()
        correct += out.correct.detach().double()
    sums = D.all_reduce(torch.cat([loss_sums, correct]))
    total = counts.clamp(min=1)
    losses, accuracies = (sums[:steps] / total).tolist(), (sums[steps:] / total).tolist()
    extra = {f"draft/loss_{j}": losses[j] for j in range(steps)}
    extra.update({f"draft/acc_{j}": accuracies[j] for j in range(steps)})
    extra.update({f"draft/positions_{j}": float(counts[j]) for j in range(steps)})
    extra["draft/simulated_acceptance_length"] = simulated_acceptance(accuracies)
    result = StepResult(loss=float(step_loss))
    result.extra = extra
    return result
