"""DeepSpeed ZeRO 0-3 under torchrun: one DeepSpeed engine per curriculum stage, state saved without pickles."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlm_train import runtime
from vlm_train.model.vlm import VLM
from vlm_train.train.config import EngineConfig, TrainConfig
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engines.base import Engine, MakeGroups, make_optimizer, overlay, plain_state
from vlm_train.train.optim import GuardedAdamW, StepReport


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _to_device(state: Any, device: torch.device) -> Any:
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state


class DeepSpeedEngine(Engine):
    """ZeRO stage `engine.zero_stage`; DeepSpeed reduces (averages) gradients over ranks, so each rank's share of
    the step loss is scaled by the world size before backward: the result is the gradient of the global loss.

    A stage change builds a new DeepSpeed engine over the same module (ZeRO 0-2) or over a fresh module that holds
    the gathered weights (ZeRO-3, whose parameters are partitioned in place). Gradient clipping and the
    non-finite check are DeepSpeed's under ZeRO 1-3 (it skips such a step on every rank), the optimizer's under ZeRO-0.
    """

    name = "deepspeed"

    def __init__(
        self,
        cfg: EngineConfig,
        train: TrainConfig,
        model: VLM,
        make_model: Callable[[], VLM],
        device: torch.device,
        dist: DistInfo,
        bf16: bool,
    ):
        super().__init__()
        if not 0 <= cfg.zero_stage <= 3:
            raise ValueError(f"engine.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
        runtime.prepare_deepspeed(device.type)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.ds = deepspeed
        self.cfg, self.train, self.dist = cfg, train, dist
        self.zero_stage = cfg.zero_stage
        self.shards_parameters = cfg.zero_stage == 3
        self.head_whole_after_forward = not self.shards_parameters
        self.device, self.bf16 = device, bf16
        self.module: VLM = model.to(device)
        self.make_model = make_model
        self.engine: Any = None
        self._optimizer: GuardedAdamW | None = None
        self.micro = 0

    @property
    def model(self) -> VLM:  # type: ignore[override]
        return self.module

    @property
    def optimizer(self) -> GuardedAdamW | None:
        return self._optimizer

    def describe(self) -> str:
        return f"{self.name} ZeRO-{self.zero_stage}"

    def trainable_parameters(self) -> int:
        # ZeRO-3 leaves a partition in each parameter; ds_numel is its full size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad)

    def ds_config(self) -> dict[str, Any]:
        clip = self.train.grad_clip if self.zero_stage > 0 else 0.0  # ZeRO-0: GuardedAdamW clips
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.train.micro_batches,
            "gradient_clipping": clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.bf16},
            "zero_allow_untested_optimizer": True,  # GuardedAdamW is torch's AdamW with a skip switch
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        return _merge(config, dict(self.cfg.deepspeed))

    def _start(self, make_groups: MakeGroups) -> None:
        if self.engine is not None:
            self._end_stage()
        groups = make_groups(self.module)
        clip = self.train.grad_clip if self.zero_stage == 0 else None
        self._optimizer = make_optimizer(groups, self.train, clip=clip)
        self.engine, *_ = self.ds.initialize(model=self.module, optimizer=self._optimizer, config=self.ds_config())
        self.micro = 0

    def _end_stage(self) -> None:
        if self.zero_stage == 3:
            fresh = self._gathered(every_rank=True)
            self.engine.destroy()
            self.module = fresh.to(self.device)  # type: ignore[union-attr]
        else:
            self.engine.destroy()
        self.engine = None

    def _gathered(self, every_rank: bool) -> VLM | None:
        """A plain model holding the full weights (ZeRO-3 gathers them one parameter at a time)."""
        keep = every_rank or self.dist.is_main
        with torch.random.fork_rng(devices=[]):  # building a model draws initial weights: not from the run's RNG
            plain = self.make_model() if keep else None
        targets = dict(plain.named_parameters()) if plain is not None else {}
        for name, param in self.module.named_parameters():
            gather = self.ds.zero.GatheredParameters([param]) if self.zero_stage == 3 else contextlib.nullcontext()
            with gather:
                if plain is not None:
                    targets[name].data.copy_(param.data.to(targets[name].dtype))
        if plain is not None:
            buffers = dict(plain.named_buffers())
            for name, buffer in self.module.named_buffers():
                buffers[name].data.copy_(buffer.data)
        return plain

    def forward_module(self) -> nn.Module:
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)
        if self.micro < self.train.micro_batches:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self, skip: bool) -> StepReport:
        assert self._optimizer is not None, "start_stage() first"
        if self.micro != self.train.micro_batches:
            raise RuntimeError(f"DeepSpeed step after {self.micro} micro-batches, expected {self.train.micro_batches}")
        with self._optimizer.deciding(skip) as report:
            self.engine.step()  # DeepSpeed calls the optimizer's step() itself
        self.micro = 0
        if self.zero_stage > 0:  # DeepSpeed measured the norm of the partitioned gradients
            value = self.engine.get_global_grad_norm()
            report.grad_norm = float("nan") if value is None else float(value)
        report.applied = bool(self.engine.was_step_applied()) and report.calls > 0 and report.applied
        return report

    def full_grads(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        grads = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                grad = safe_get_full_grad(param)
                if grad is not None:
                    grads[name] = grad.detach().clone().cpu()
        return grads

    def export_model(self) -> VLM | None:
        # A plain copy even under ZeRO 0-2, whose parameters are views into DeepSpeed's flat buffers.
        return self._gathered(every_rank=False)

    def optimizer_state(self) -> dict[str, Any]:
        # This rank's partition: base optimizer state and fp32 master weights, tensors and numbers only.
        return plain_state(self.engine.optimizer.state_dict())

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        optimizer = self.engine.optimizer
        state = overlay(optimizer.state_dict(), _to_device(state, self.device))
        if "load_from_fp32_weights" in inspect.signature(optimizer.load_state_dict).parameters:
            # ZeRO 1-3: a list with every rank's state; same world size, so only ours is read. The fp32 master
            # weights come from the checkpoint, not from the (possibly bf16) model weights.
            optimizer.load_state_dict(
                [state] * self.dist.world_size, load_optimizer_states=True, load_from_fp32_weights=True
            )
        else:
            optimizer.load_state_dict(state)  # ZeRO-0: GuardedAdamW itself, or DeepSpeed's bf16 wrapper of it

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
