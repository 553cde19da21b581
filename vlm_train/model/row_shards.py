"""Parameters split by rows over ranks, as FSDP2 splits them: which rows a rank holds, and setting them from a whole
tensor (so weight loaders work the same on a whole and on a sharded model)."""

from __future__ import annotations

import torch


def row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, stop) of a tensor with `rows` rows that rank `rank` of `world_size` holds."""
    chunk = -(-rows // world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def local_part(value: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a whole tensor (a 0-d tensor is whole on every rank)."""
    if value.dim() == 0:
        return value
    start, stop = row_range(value.shape[0], rank, world_size)
    return value[start:stop]


def copy_whole_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a parameter from its whole value: a DTensor sharded by rows (FSDP2) takes only its own rows."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        param.copy_(value)
        return
    mesh = param.device_mesh
    local = param.to_local()
    part = local_part(value, mesh.get_local_rank(), mesh.size())
    if tuple(part.shape) != tuple(local.shape):
        raise RuntimeError(f"a shard of shape {list(local.shape)} cannot take rows of shape {list(part.shape)}")
    local.copy_(part.to(local.dtype))
