"""PyTorch FSDP2 (`fully_shard`) under torchrun: every parameter split by rows over the ranks, gathered per block.

Each ViT block, each decoder layer and the root (the rest: embeddings, head, merger, norms, what a stage kind
attaches) is one FSDP group. The model may be built on the meta device: `materialize` allocates only this rank's
shards, then the initial weights stream in one tensor at a time (a checkpoint's shards, a Hugging Face folder, or
a random draw per tensor). Checkpoints are row shards per rank (engines/shards.py) that load at any world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from vlm_train.data.state import stable_seed
from vlm_train.jsonio import dumps
from vlm_train.model.attachments import attached
from vlm_train.model.norm import RMSNorm
from vlm_train.model.row_shards import copy_whole_into, row_range
from vlm_train.model.vlm import VLM
from vlm_train.train import distributed as D
from vlm_train.train.config import EngineConfig, TrainConfig
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engines.base import Engine, MakeGroups, make_optimizer
from vlm_train.train.engines.shards import SHARDS_INDEX, Piece, ShardedTensors, save_pieces
from vlm_train.train.model_files import MODEL_FILE
from vlm_train.train.optim import GuardedAdamW, StepReport

log = logging.getLogger("vlm_train")

MODEL_SHARDS = "model"  # model_rankNNNNN.safetensors: this rank's rows of every parameter
OPTIMIZER_SHARDS = "optimizer"  # optimizer_rankNNNNN.safetensors: this rank's rows of every Adam moment
# The decoder layer's methods that generation calls instead of forward: FSDP gathers the layer for them too.
LAYER_METHODS = ("prefill", "decode", "extend")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FSDP2Engine(Engine):
    """FSDP2 data parallelism. The loss handed to `backward` is this rank's share of the global step loss, so the
    gradients are summed over ranks: the reduction divides by 1, never by the world size (and never asks gloo for
    its AVG, which sums: PyTorch issue 162338). Micro-batches before the last keep their gradients unreduced.
    Clipping and the non-finite check use the global norm of the sharded gradients, the same on every rank.
    """

    name = "fsdp2"
    shards_parameters = True

    def __init__(
        self, cfg: EngineConfig, train: TrainConfig, model: VLM, device: torch.device, dist: DistInfo, bf16: bool
    ):
        super().__init__()
        self.cfg, self.train, self.device, self.bf16 = cfg, train, device, bf16
        self.rank, self.world_size = dist.rank, dist.world_size
        if not torch.distributed.is_initialized():  # one process (torchrun only joins a group for several)
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        check_fits(model, self.world_size, available_bytes(device))  # before any rank allocates its shards
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        # bf16 parameters in the blocks' compute, fp32 gradients reduced and fp32 masters in the optimizer.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        reshard = bool(cfg.fsdp.reshard_after_forward)
        for block in [*model.vision.blocks, *model.llm.layers]:
            fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=reshard)
        for layer in model.llm.layers:
            for method in LAYER_METHODS:
                if hasattr(layer, method):
                    register_fsdp_forward_method(layer, method)
        # The root's weights (embeddings, LM head, merger, norms) stay gathered from forward to backward: the loss
        # calls the LM head after the model's forward.
        fully_shard(model, mesh=self.mesh, mp_policy=policy, reshard_after_forward=False)
        self.model = model
        self.root: FSDPModule = model  # type: ignore[assignment]
        for module in model.modules():  # summed, see the class docstring (each group keeps its own factor)
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # SUM then x1: no PREMUL_SUM, which gloo lacks
        self._optimizer: GuardedAdamW | None = None
        self.micro = 0

    @property
    def optimizer(self) -> GuardedAdamW | None:
        return self._optimizer

    def describe(self) -> str:
        how = "reshard after forward" if self.cfg.fsdp.reshard_after_forward else "no reshard after forward"
        return f"{self.name} ({how})"

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # a DTensor's numel is whole

    # ---- the initial weights, into the shards ---------------------------------------------------------------

    def materialize(self, seed: int, checkpoint: Path | None = None) -> None:
        """This rank's shards of a model built on the meta device, with its initial weights: a random draw
        (`draw_initial_weights`), then a checkpoint's if given (its shards, or whole files), one tensor at a time.
        The weights a model config names (model.init_*_from_hf) are the caller's to load: its loaders fill shards."""
        self.draw_initial_weights(seed)
        if checkpoint is None:
            return
        if (checkpoint / SHARDS_INDEX).is_file():
            self.load_model_shards(checkpoint)
        else:
            files = {"": checkpoint / MODEL_FILE}
            files.update({a.name: checkpoint / a.file for a in attached(self.model) if (checkpoint / a.file).is_file()})
            self.load_whole_weights(files)

    def draw_initial_weights(self, seed: int) -> None:
        """Allocate this rank's shards of a model built on the meta device and draw its initial weights: each
        tensor whole from a generator of (seed, its name), one at a time, by the model's rules (normal at the
        tower's initializer_range for linear and embedding weights, zero biases, unit norms), then keep our rows.
        Tensors already on a device (what a stage kind attached for real) keep their values."""
        kept = {n: _local(p).detach().clone() for n, p in self.model.named_parameters() if not p.is_meta}
        kept_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers() if not b.is_meta}
        self.model.to_empty(device=self.device)
        stds = {
            "vision.": self.model.cfg.vision.initializer_range,
            "projector.": self.model.cfg.vision.initializer_range,
        }
        with torch.no_grad():
            for module_name, module in self.model.named_modules():
                for name, param in module.named_parameters(recurse=False):
                    full_name = f"{module_name}.{name}" if module_name else name
                    if full_name in kept:
                        _local(param).copy_(kept[full_name])
                        continue
                    std = next((s for p, s in stds.items() if full_name.startswith(p)), None)
                    std = self.model.cfg.llm.initializer_range if std is None else std
                    value = _initial_value(module, name, tuple(param.shape), std, seed, full_name)
                    self.copy_whole(param, value)
            for name, buffer in self.model.named_buffers():
                if name in kept_buffers:
                    buffer.copy_(kept_buffers[name])

    def copy_whole(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set a (sharded) parameter from its whole value: only this rank's rows are copied."""
        copy_whole_into(param, value)

    def copy_rows(self, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Set this rank's rows of a (sharded) parameter."""
        local = _local(param)
        if tuple(rows.shape) != tuple(local.shape):
            raise RuntimeError(f"a shard of shape {list(local.shape)} cannot take rows of shape {list(rows.shape)}")
        local.copy_(rows.to(local.dtype))

    def load_whole_weights(self, files: dict[str, Path]) -> None:
        """Set the parameters from whole-weight safetensors files (prefix -> file: "" for model.safetensors, an
        attachment's name for its file), reading one tensor at a time; the same checks as a sharded load."""
        from safetensors import safe_open

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for prefix, path in files.items():
                with safe_open(str(path), framework="pt") as weights:
                    for key in weights.keys():
                        name = f"{prefix}.{key}" if prefix else key
                        if name not in params:
                            if name.endswith("lm_head.weight") and self.model.cfg.llm.tie_word_embeddings:
                                continue  # the tied head, stored by some writers
                            raise ValueError(f"{path}: tensor {key!r} is not a parameter of the model ({name})")
                        shape = tuple(weights.get_slice(key).get_shape())
                        if shape != tuple(params[name].shape):
                            raise ValueError(
                                f"{path}: tensor {key!r} has shape {list(shape)} there, {list(params[name].shape)} in "
                                "the model"
                            )
                        self.copy_whole(params.pop(name), weights.get_tensor(key))
        fresh = tuple(f"{a.name}." for a in attached(self.model) if a.name not in files)  # no file: they start fresh
        missing = [n for n in params if not n.startswith(fresh)]
        if missing:
            raise ValueError(f"{files.get('')}: no tensor {missing[0]!r} (and {len(missing) - 1} more missing)")

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """The root's weights gathered for evaluation and generation (which call the embeddings and the head outside
        the model's forward); each block is gathered by its own hooks, also for the KV-cache methods."""
        self.root.unshard()
        try:
            yield
        finally:
            self.root.reshard()

    # ---- a stage's optimizer --------------------------------------------------------------------------------

    def _start(self, make_groups: MakeGroups) -> None:
        # The optimizer updates the fp32 shards; clipping is ours (global norm), so the optimizer gets no clip.
        self._optimizer = make_optimizer(make_groups(self.model), self.train, clip=None)
        self.micro = 0
        # FSDP2 fixes each group's gradient dtypes (bf16 compute, fp32 reduction) from the parameters that train at
        # its first forward; a stage that unfreezes a group must have them set again (private API: torch has none).
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    group._init_mp_dtypes()

    def forward_module(self) -> nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        last = self.micro >= self.train.micro_batches
        self.root.set_requires_gradient_sync(last)  # reduce-scatter once, after the step's last micro-batch
        loss.backward()

    def step(self, skip: bool) -> StepReport:
        assert self._optimizer is not None, "start_stage() first"
        if self.micro != self.train.micro_batches:
            raise RuntimeError(f"FSDP2 step after {self.micro} micro-batches, expected {self.train.micro_batches}")
        self.micro = 0
        params = [p for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = self._global_norm(params)
        clip = self.train.grad_clip
        if math.isfinite(norm) and clip > 0 and norm > clip:
            for p in params:
                _local(p.grad).mul_(clip / (norm + 1e-6))
        report = self._optimizer.step(skip=skip or not math.isfinite(norm))
        report.grad_norm = norm
        self._optimizer.zero_grad(set_to_none=True)
        return report

    def _global_norm(self, params: list[torch.Tensor]) -> float:
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            squares += _local(p.grad).double().pow(2).sum()
        return math.sqrt(float(D.all_reduce(squares)))

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone().cpu()
            for n, p in self.model.named_parameters()
            if p.grad is not None
        }

    # ---- weights and state ------------------------------------------------------------------------------------

    def export_model(self) -> VLM | None:
        raise NotImplementedError("engine=fsdp2 never gathers the whole model: read its sharded checkpoint")

    def whole_parameters(self):
        """Every parameter whole, one at a time, on every rank (a collective: call on every rank)."""
        for name, param in self.model.named_parameters():
            yield name, (param.full_tensor() if isinstance(param, DTensor) else param).detach()

    def model_pieces(self) -> list[Piece]:
        return [
            Piece(
                name, _local(p), row_range(p.shape[0], self.rank, self.world_size)[0] if p.dim() else 0, tuple(p.shape)
            )
            for name, p in self.model.named_parameters()
        ]

    def save_weights(self, folder: Path) -> None:
        """This rank's rows of the model and of the optimizer's moments (with its step counts and the stage)."""
        save_pieces(folder, MODEL_SHARDS, self.rank, self.world_size, self.model_pieces())
        assert self._optimizer is not None, "start_stage() first"
        names = {id(p): n for n, p in self.model.named_parameters()}
        pieces = []
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                state = self._optimizer.state.get(p, {})
                for key, value in state.items():
                    start = (
                        row_range(p.shape[0], self.rank, self.world_size)[0]
                        if torch.is_tensor(value) and value.dim()
                        else 0
                    )
                    whole = tuple(p.shape) if torch.is_tensor(value) and value.dim() else ()
                    tensor = _local(value) if torch.is_tensor(value) else torch.tensor(float(value))
                    pieces.append(Piece(f"{names[id(p)]}/{key}", tensor, start, whole))
        pieces.append(Piece("__stage__", torch.tensor(self.stage_index), 0, ()))
        save_pieces(folder, OPTIMIZER_SHARDS, self.rank, self.world_size, pieces)
        if self.rank == 0:
            index = {
                "world_size": self.world_size,
                "model": MODEL_SHARDS,
                "optimizer": OPTIMIZER_SHARDS,
                "attachments": {a.name: a.file for a in attached(self.model)},
            }
            (folder / SHARDS_INDEX).write_text(dumps(index, indent=1))

    def load_model_shards(self, folder: Path) -> None:
        """Set every parameter from a sharded checkpoint saved at any world size; a missing tensor or another
        shape is an error naming it."""
        saved = ShardedTensors(folder, MODEL_SHARDS)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name not in saved.places:
                    raise ValueError(f"checkpoint {folder} ({MODEL_SHARDS} shards) has no tensor {name!r}")
                if saved.shape(name) != tuple(param.shape):
                    raise ValueError(
                        f"checkpoint {folder}: tensor {name!r} has shape {list(saved.shape(name))} there, "
                        f"{list(param.shape)} in the model"
                    )
                self.copy_rows(param, saved.rows(name, self.rank, self.world_size))

    def load_optimizer_shards(self, folder: Path) -> None:
        """The optimizer state of a sharded checkpoint (any world size), applied when its stage starts."""
        saved = ShardedTensors(folder, OPTIMIZER_SHARDS)
        self._restored = {"stage": int(saved.whole("__stage__")), "optimizer": saved}

    def load_optimizer_state(self, state: Any) -> None:
        assert self._optimizer is not None, "start_stage() first"
        saved: ShardedTensors = state
        names = {id(p): n for n, p in self.model.named_parameters()}
        saved_keys: dict[str, list[str]] = {}  # parameter name -> its saved state keys (exp_avg, step, ...)
        for entry in saved.names():
            param_name, _, key = entry.rpartition("/")
            saved_keys.setdefault(param_name, []).append(key)
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                prefix = f"{names[id(p)]}/"
                keys = saved_keys.get(names[id(p)], [])
                if not keys:
                    continue
                slot = {}
                for key in keys:
                    if len(saved.shape(prefix + key)) == 0:  # Adam's step count: where torch keeps it
                        on_device = self._optimizer.defaults.get("fused") or self._optimizer.defaults.get("capturable")
                        step = saved.whole(prefix + key).clone()
                        slot[key] = step.to(p.device) if on_device else step
                    else:
                        local = saved.rows(prefix + key, self.rank, self.world_size).to(self.device)
                        slot[key] = DTensor.from_local(
                            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                        )
                self._optimizer.state[p] = slot

    def optimizer_state(self) -> dict[str, Any]:
        raise NotImplementedError("engine=fsdp2 saves its optimizer as shards (save_shards)")

    def close(self) -> None:
        self._optimizer = None


# What training keeps per parameter, sharded: the fp32 weight, its gradient and Adam's two moments.
BYTES_PER_PARAMETER = 16


def available_bytes(device: torch.device) -> int:
    """Memory this rank may use: the GPU's total, or its share of the host's available memory (the ranks of a node
    share it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").is_file() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // max(local_ranks, 1)
    return 1 << 62  # unknown: no check


def check_fits(model: nn.Module, world_size: int, available: int) -> None:
    """A clear error when this world size cannot hold the model's shards, before anything is allocated: each rank
    keeps 1/N of the weights, gradients and Adam moments, plus the largest block gathered whole."""
    total = sum(p.numel() for p in model.parameters())
    blocks = [*model.vision.blocks, *model.llm.layers]  # type: ignore[attr-defined]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    root = total - sum(p.numel() for b in blocks for p in b.parameters())  # gathered from forward to backward
    need = BYTES_PER_PARAMETER * total // world_size + 4 * (largest + root)
    if need > available:
        fewest = -(-BYTES_PER_PARAMETER * total // max(available - 4 * (largest + root), 1))
        gathered = 4 * (largest + root)
        raise RuntimeError(
            f"engine=fsdp2 on {world_size} rank(s) needs about {_size(need)} per rank for a model of "
            f"{total / 1e6:.1f}M parameters ({BYTES_PER_PARAMETER} bytes each for weight, gradient and Adam moments, "
            f"sharded, plus {_size(gathered)} gathered), but a rank has {_size(available)}: launch more ranks"
            + (f" (at least {fewest})" if available > gathered else "")
            + " or train a smaller model"
        )


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _initial_value(module: nn.Module, name: str, shape: tuple[int, ...], std: float, seed: int, full_name: str):
    """One tensor's initial value, as VLM's init_weights draws it, from a generator of (seed, its name)."""
    if isinstance(module, RMSNorm) or (isinstance(module, nn.LayerNorm) and name == "weight"):
        return torch.ones(shape)
    if name == "bias":
        return torch.zeros(shape)
    if isinstance(module, (nn.Linear, nn.Embedding)) or name.endswith("probe"):
        generator = torch.Generator().manual_seed(stable_seed(seed, "init", full_name) % (1 << 63))
        return torch.empty(shape).normal_(0.0, std, generator=generator)
    raise ValueError(
        f"engine=fsdp2 cannot draw the initial value of {full_name} ({type(module).__name__}.{name}) on the meta "
        "device: give it a rule in engines/fsdp2.py, or start from a checkpoint (model.init_from_hf, train.resume)"
    )
