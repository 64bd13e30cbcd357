"""Table 13's overhead columns for a checkpoint: parameters, latency, peak memory and FLOPs.

Latency is the median of timed single-image forward passes after warm-up, on the profile's
device; peak memory is only defined on CUDA (None elsewhere); FLOPs are counted by
torch's FlopCounterMode for one image (2 per multiply-add, the paper's convention).
Latency and memory describe the machine as much as the model, so they are measured only
when asked (`timing`): a profile whose outputs are committed leaves them to benchmarks/.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from moeclip.checkpoint import load_model
from moeclip.params import resolve_device

WARMUP = 3


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_cost(checkpoint: Path, test_time: Mapping[str, object] | None, device: str, timing: bool,
                 repeats: int) -> dict[str, float | None]:
    """params_m (M), inference_ms (batch 1, median of `repeats`), peak_memory_mb (CUDA only) and flops_g (G).

    Without `timing`, inference_ms and peak_memory_mb are None.
    """
    device = torch.device(resolve_device(device))
    model, _ = load_model(checkpoint, device, test_time)
    size = model.config.image_size
    image = torch.randn(1, 3, size, size, device=device)
    classes = ["object"]

    def forward() -> None:
        model.predict(image, classes, "industrial")

    with FlopCounterMode(display=False) as counter:
        forward()
    counts = {"params_m": model.parameter_counts()["total"] / 1e6, "flops_g": counter.get_total_flops() / 1e9}
    if not timing:
        return {**counts, "inference_ms": None, "peak_memory_mb": None}
    for _ in range(min(WARMUP, repeats)):
        forward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        forward()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {**counts, "inference_ms": 1000 * statistics.median(timings), "peak_memory_mb": peak}
