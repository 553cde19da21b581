"""Devices and dtypes, for training and inference alike: which device a process runs on, the dtype names the command
line takes, and the autocast that running a model for inference needs."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda as a torch device; a GPU is this process's own (LOCAL_RANK under torchrun)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def inference_autocast(device: torch.device, model: nn.Module) -> torch.autocast:
    """bf16 autocast on CUDA (as in training) or when the weights are bf16; a no-op otherwise."""
    weight = next(model.parameters(), None)
    bf16 = weight is not None and weight.dtype == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or bf16)
