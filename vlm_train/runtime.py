"""Process-wide side effects, all in one place: environment variables, warning and log filters, thread counts and
allocator settings. Nothing else in vlm_train changes global state; everything here is called by name from the
entry point or the component that needs it, never on import."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings

import torch

log = logging.getLogger("vlm_train")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def set_cpu_threads(threads: int) -> None:
    """engine.threads: torch's CPU threads in this process (0 leaves torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def log_on_main_only(is_main: bool) -> None:
    """One progress log per run: ranks other than 0 log warnings and errors only."""
    if not is_main:
        log.setLevel(logging.WARNING)


def prepare_deepspeed(device_type: str) -> None:
    """Before `import deepspeed`: its accelerator from our device, and its messages that are not the user's to act on
    (the optimizer is torch's AdamW, the model's output is a dataclass ZeRO-3 needs no hooks for, and the collectives
    it still calls are deprecated in this torch)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.setLevel(logging.WARNING)
    logging.getLogger("compilers").setLevel(logging.WARNING)  # setuptools' compiler probes for DeepSpeed's ops
    if not any(getattr(f, "vlm_train", False) for f in ds_log.filters):
        ds_log.addFilter(_DeepSpeedNoise())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class _DeepSpeedNoise(logging.Filter):
    vlm_train = True

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in ("untested optimizer", "VLMOutput"))


def reuse_freed_memory() -> None:
    """In a process that makes packs (glibc only): keep freed buffers for reuse rather than give them back.

    Every pack allocates its patches anew (~100 MB at 512 px); returned to the OS and faulted in again, fresh
    pages cost more than filling them, so a loader worker spent a third of its time in page faults.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
