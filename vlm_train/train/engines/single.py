"""One process, on the CPU or one GPU (bf16 autocast on a GPU)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from vlm_train.model.vlm import VLM
from vlm_train.train.config import TrainConfig
from vlm_train.train.engines.base import Engine, MakeGroups, make_optimizer, overlay, plain_state
from vlm_train.train.optim import GuardedAdamW, StepReport


class SingleEngine(Engine):
    """The model and a GuardedAdamW in this process; the optimizer clips and checks the gradient norm itself."""

    name = "single"

    def __init__(self, model: VLM, train: TrainConfig, device: torch.device, bf16: bool):
        super().__init__()
        self.model = model.to(device)
        self.train = train
        self.device = device
        self.bf16 = bf16
        self._optimizer: GuardedAdamW | None = None

    @property
    def optimizer(self) -> GuardedAdamW | None:
        return self._optimizer

    def _start(self, make_groups: MakeGroups) -> None:
        self._optimizer = make_optimizer(make_groups(self.model), self.train, clip=self.train.grad_clip)

    def forward_module(self) -> nn.Module:
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool) -> StepReport:
        assert self._optimizer is not None, "start_stage() first"
        report = self._optimizer.step(skip=skip)
        self._optimizer.zero_grad(set_to_none=True)
        return report

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def export_model(self) -> VLM:
        return self.model

    def optimizer_state(self) -> dict[str, Any]:
        assert self._optimizer is not None, "start_stage() first"
        return plain_state(self._optimizer.state_dict())

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        assert self._optimizer is not None, "start_stage() first"
        # torch's Optimizer.load_state_dict moves each state tensor to its parameter's device.
        self._optimizer.load_state_dict(overlay(self._optimizer.state_dict(), state))

    def close(self) -> None:
        self._optimizer = None
