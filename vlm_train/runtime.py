"""Process-wide side effects, all in one place: environment variables, warning and log filters, thread counts and
allocator settings. Nothing else in vlm_train changes global state; everything here is called by name from the
entry point or the component that needs it, never on import."""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
import warnings

import torch

log = logging.getLogger("vlm_train")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def die_with_parent(main_pid: int, direct: bool, worker_id: int = 0) -> None:
    """A process's init (a loader worker's): end it when the training process `main_pid` ends, however it ends.

    Left alone, a worker outlives a parent killed by SIGKILL or the OOM killer: torch's watchdog sees the parent go
    only between packs, and then the worker's exit waits for its queue's feeder thread, stuck writing a pack to a
    full pipe that its siblings still hold open. Started by the training process itself (`direct`: fork, spawn),
    on Linux the kernel kills it (PR_SET_PDEATHSIG, which fires when the thread that started the worker ends:
    iterate the loader from a thread that outlives it); a parent that died before that was set has left the worker
    to another parent, and it ends at once. Otherwise (a forkserver, which lives on while its workers do; no prctl)
    a thread watches the training process.
    """
    if direct and _set_death_signal():
        if os.getppid() != main_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    threading.Thread(target=_kill_self_when_gone, args=(main_pid,), daemon=True, name="loader-watch").start()


def _set_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_self_when_gone(pid: int) -> None:
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable once the process has ended (Linux >= 5.3)
    except ProcessLookupError:
        pass
    except (AttributeError, OSError):
        while _exists(pid):
            time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
