"""Throughput numbers: device peak FLOP/s for MFU, and memory in use."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peak TFLOP/s per device, from the vendors' datasheets (no sparsity). The longest name
# contained in torch.cuda.get_device_name() wins, so "H100 PCIe" beats "H100". Set logger.peak_tflops otherwise.
PEAK_TFLOPS_BF16: dict[str, float] = {
    "B200": 2250.0,
    "B100": 1750.0,
    "GB200": 2500.0,
    "H200": 989.4,
    "GH200": 989.4,
    "H100": 989.4,  # SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "A40": 149.7,
    "A30": 165.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 6000 Ada": 364.2,
    "RTX A6000": 154.8,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (V100 has no bf16)
    "T4": 65.0,  # fp16
    "MI300X": 1307.4,
    "MI250X": 383.0,
}


def device_peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table's entry for this GPU, else None (CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_TFLOPS_BF16 if key in name]
    return PEAK_TFLOPS_BF16[max(matches, key=len)] * 1e12 if matches else None


def mfu(flops: float, seconds: float, peak_per_device: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None without a peak)."""
    if peak_per_device is None or seconds <= 0:
        return None
    return flops / seconds / (peak_per_device * world_size)


def memory_gb(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: CUDA allocator on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return {
            "memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory/max_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}
