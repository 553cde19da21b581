"""torch.distributed for the trainer: one process group, set up from torchrun's environment, and small helpers
that are no-ops in a single process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank, world size and local rank as torchrun sets them (a plain launch is rank 0 of 1)."""
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def init_process_group(timeout_minutes: int = 30) -> DistInfo:
    """Join torchrun's process group once (gloo for CPU tensors, NCCL for CUDA ones when there is a GPU)."""
    info = env_info()
    if info.active and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def shared_start_time() -> datetime.datetime:
    """Rank 0's clock, so that `${now:...}` in run.dir names one folder on every rank."""
    now = datetime.datetime.now()
    if not dist.is_initialized():
        return now
    box = [now.timestamp()]
    dist.broadcast_object_list(box, src=0)
    return datetime.datetime.fromtimestamp(box[0])


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (sum or max); the tensor is returned for chaining."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_object(value: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_gather_rows(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's rows of each tensor, in rank order (the first dimension may differ by rank, the others may
    not), and where this rank's rows start in each. No gradient flows back: callers that need one compute the
    loss of the gathered rows on every rank alike and take the gradient of their own rows (see vision_step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(tensors), [0] * len(tensors)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = tensors[0].device if tensors else torch.device("cpu")
    counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long, device=device)
    every = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    per_rank = torch.stack(every).cpu()  # [ranks, tensors]
    gathered, starts = [], []
    for i, tensor in enumerate(tensors):
        starts.append(int(per_rank[:rank, i].sum()))
        most = int(per_rank[:, i].max())
        if most == 0:
            gathered.append(tensor)
            continue
        padded = tensor.new_zeros((most, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered.append(torch.cat([part[: int(n)] for part, n in zip(parts, per_rank[:, i])]))
    return gathered, starts


def broadcast_object(value: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def scatter_object(values: list[Any] | None, src: int = 0) -> Any:
    """Rank r's item of `values`, a list with one item per rank given on `src` (None elsewhere)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        assert values is not None
        return values[0]
    received: list[Any] = [None]
    dist.scatter_object_list(received, values if dist.get_rank() == src else None, src=src)
    return received[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Destroy the process group; after a clean run, only once every rank is here.

    Without the barrier a rank that finishes first tears down its gloo pairs while another still uses them,
    and that rank can abort at exit ("terminate called without an active exception"). After an error the
    other ranks may never arrive, so there is no barrier then.
    """
    if dist.is_initialized():
        if clean:
            barrier()
        dist.destroy_process_group()
