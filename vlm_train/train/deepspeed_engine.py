"""DeepSpeed ZeRO 0-3 under torchrun: one DeepSpeed engine per curriculum stage, state saved without pickles."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_train.model.vlm import VLM
from vlm_train.train.checkpoint import rank_file
from vlm_train.train.config import EngineConfig, TrainConfig
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engine import Engine, make_optimizer, overlay, plain_state
from vlm_train.train.optim import GuardedAdamW


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedEngine(Engine):
    """ZeRO stage `engine.zero_stage`; DeepSpeed reduces (averages) gradients over ranks, so each rank's share of
    the step loss is scaled by the world size before backward: the result is the gradient of the global loss.

    A stage change builds a new DeepSpeed engine over the same module (ZeRO 0-2) or over a fresh module that holds
    the gathered weights (ZeRO-3, whose parameters are partitioned in place). Gradient clipping and the
    non-finite check are DeepSpeed's under ZeRO 1-3 (it skips such a step on every rank), the optimizer's under ZeRO-0.
    """

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
        if not 0 <= cfg.zero_stage <= 3:
            raise ValueError(f"engine.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        ds_log = logging.getLogger("DeepSpeed")
        ds_log.setLevel(logging.WARNING)
        logging.getLogger("compilers").setLevel(logging.WARNING)  # setuptools' compiler probes for DeepSpeed's ops
        # GuardedAdamW is torch's AdamW; VLM itself holds no parameters, so ZeRO-3 needs no hooks on its output.
        ds_log.addFilter(lambda r: not any(s in r.getMessage() for s in ("untested optimizer", "VLMOutput")))
        # DeepSpeed still calls collectives that this torch deprecates; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.ds = deepspeed
        self.cfg, self.train, self.dist = cfg, train, dist
        self.zero_stage = cfg.zero_stage
        self.device, self.bf16 = device, bf16
        self.module: VLM = model.to(device)
        self.make_model = make_model
        self.engine: Any = None
        self.optimizer: GuardedAdamW | None = None
        self.micro = 0

    @property
    def model(self) -> VLM:  # type: ignore[override]
        return self.module

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

    def start_stage(self, make_groups: Callable[[nn.Module], list[dict]]) -> None:  # type: ignore[override]
        if self.engine is not None:
            self._end_stage()
        groups = make_groups(self.module)
        self.optimizer = make_optimizer(groups, self.train, clip=self.train.grad_clip if self.zero_stage == 0 else None)
        self.engine, *_ = self.ds.initialize(model=self.module, optimizer=self.optimizer, config=self.ds_config())
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

    def step(self, skip: bool) -> tuple[float, bool]:
        assert self.optimizer is not None
        if self.micro != self.train.micro_batches:
            raise RuntimeError(f"DeepSpeed step after {self.micro} micro-batches, expected {self.train.micro_batches}")
        self.optimizer.reset()
        self.optimizer.skip_next = skip
        self.engine.step()
        self.optimizer.skip_next = False
        self.micro = 0
        if self.zero_stage == 0:
            norm = self.optimizer.last_norm
        else:
            value = self.engine.get_global_grad_norm()
            norm = float("nan") if value is None else float(value)
        applied = bool(self.engine.was_step_applied()) and self.optimizer.stepped and not self.optimizer.last_skipped
        return norm, applied

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's reduced gradient (call between the last backward and step)."""
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

    def _optimizer_file(self, folder: Path) -> Path:
        return rank_file(folder, "optimizer", self.dist.rank, "pt")

    def save_optimizer(self, folder: Path) -> None:
        # This rank's partition: base optimizer state and fp32 master weights, tensors and numbers only.
        torch.save(plain_state(self.engine.optimizer.state_dict()), self._optimizer_file(folder))

    def load_optimizer(self, folder: Path) -> None:
        path = self._optimizer_file(folder)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: resume with the world size the checkpoint was saved with")
        saved = torch.load(path, map_location=self.device, weights_only=True)
        optimizer = self.engine.optimizer
        state = overlay(optimizer.state_dict(), saved)
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
