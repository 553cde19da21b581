"""What the benchmarks share. The packed-vs-padded ones (tools/bench_step.py, tools/bench_vision_stage.py): a layout
runs the same work one way, and the harness measures each layout's passes and peak memory. The video ones
(tools/bench_loader.py --video, tools/bench_video_decoders.py): the clips they decode (`write_clip`).

On CUDA the layouts run one after the other (peaks reset per layout). On CPU both live in one process and their
timed passes alternate, so a shared machine's load falls on both alike; peak RSS cannot be reset, so a layout's own
memory figure comes from a fresh process (the tool's `isolated_memory`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from vlm_train.data.image import PatchSpec
from vlm_train.model.config import VisionConfig


def bench_patch_spec(vision: VisionConfig, min_side: int, max_side: int) -> PatchSpec:
    """The tower's patch geometry, with a pixel range that keeps images of min_side..max_side px as drawn."""
    return PatchSpec(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=min(56 * 56, min_side**2),
        max_pixels=max_side**2,
    )


class Layout(Protocol):
    device: torch.device

    def warmup(self) -> None: ...

    def timed_pass(self) -> None: ...

    def figures(self, peak_memory_mb: float) -> dict[str, Any]: ...


class TimedLayout(ABC):
    """Steps 0 .. warmup-1 run untimed once; each timed pass runs the others. A subclass defines `step(index)`:
    forward, backward and optimizer step, returning the loss (recorded in `losses`)."""

    def __init__(self, device: torch.device, warmup: int, total: int) -> None:
        self.device, self.num_warmup, self.num_total = device, warmup, total
        self.losses: list[float] = []
        self.passes: list[float] = []  # wall time of each timed pass

    @abstractmethod
    def step(self, index: int) -> torch.Tensor: ...

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self) -> None:
        for index in range(self.num_warmup):
            self.losses.append(float(self.step(index).detach()))

    def timed_pass(self) -> None:
        """One pass over the timed steps; its wall time joins `passes`."""
        self._sync()
        started = time.perf_counter()
        for index in range(self.num_warmup, self.num_total):
            self.losses.append(float(self.step(index).detach()))
        self._sync()
        self.passes.append(time.perf_counter() - started)

    @property
    def fastest_pass(self) -> float:
        return min(self.passes)  # on a shared machine, noise only slows down


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux, else ru_maxrss.

    ru_maxrss survives exec: a spawned child starts at its parent's peak, which would hide its own growth.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def memory_mb(device: torch.device) -> float:
    """CUDA: memory allocated now; CPU: the peak RSS so far."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()


def run_alone(layout: Layout, repeats: int) -> dict[str, Any]:
    """One layout alone: warm-up, then `repeats` timed passes; its peak memory over all of them."""
    cuda = layout.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(layout.device)
    before = memory_mb(layout.device)
    layout.warmup()
    for _ in range(repeats):
        layout.timed_pass()
    peak = torch.cuda.max_memory_allocated(layout.device) / 2**20 if cuda else peak_rss_mb()
    return layout.figures(peak - before)


def run_alternating(
    make: dict[str, Callable[[], Layout]], repeats: int, isolated_memory: Callable[[str], float] | None = None
) -> dict[str, dict[str, Any]]:
    """CPU: every layout in this process, their timed passes alternating; memory from `isolated_memory(mode)` when
    given (else the RSS growth here, meaningful for the first layout only)."""
    layouts, memory = {}, {}
    for mode, build in make.items():
        before = peak_rss_mb()
        layouts[mode] = build()
        layouts[mode].warmup()
        layouts[mode].timed_pass()
        memory[mode] = peak_rss_mb() - before
    for _ in range(repeats - 1):
        for layout in layouts.values():
            layout.timed_pass()
    if isolated_memory is not None:
        memory = {mode: isolated_memory(mode) for mode in make}
    return {mode: layout.figures(memory[mode]) for mode, layout in layouts.items()}


def isolated_peak_memory(run_mode: Callable[..., dict[str, Any]], cfg: Any, mode: str, *args: Any) -> float:
    """A layout's peak RSS growth, measured by `run_mode(cfg, mode, *args)` (one timed pass) in a fresh process so
    the figure is its own; `run_mode` must be a module-level function (it is pickled to the child)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_mode, (dataclasses.replace(cfg, repeats=1), mode, *args))["peak_memory_mb"]


def write_clip(path: str, seconds: float, width: int, height: int, fps: int, seed: int) -> None:
    """An H.264 clip (yuv420p, CRF 23 as libx264's default) of a drifting gradient with moving discs."""
    import av

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    discs = rng.uniform(0, 1, (5, 5))  # x, y, vx, vy, colour seed per disc
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            phase = i / fps
            base = np.stack([np.sin(x / 60 + phase + c) * np.cos(y / 45 - phase) for c in range(3)], -1)
            pixels = (127 + 90 * base + rng.normal(0, 4, (height, width, 3))).clip(0, 255).astype(np.uint8)
            for cx, cy, vx, vy, colour in discs:
                px, py = int((cx + vx * phase / 10) % 1 * width), int((cy + vy * phase / 10) % 1 * height)
                pixels[max(0, py - 30) : py + 30, max(0, px - 30) : px + 30] = int(colour * 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
