"""Table 13's overhead columns for a checkpoint: parameters, latency, peak memory and FLOPs.

Latency is the median of timed single-image forward passes after warm-up, on the profile's
device; peak memory is only defined on CUDA (None elsewhere); FLOPs are counted by
torch's FlopCounterMode for one image (2 per multiply-add, the paper's convention), see
`inference_flop_counts` for what is counted.
Latency and memory describe the machine as much as the model, so they are measured only
when asked (`timing`): a profile whose outputs are committed leaves them to benchmarks/.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moeclip.checkpoint import load_model
from moeclip.config import Domain
from moeclip.methods.base import ZeroShotMethod
from moeclip.runtime import resolve_device

WARMUP = 3


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def inference_flop_counts(model: ZeroShotMethod, image: torch.Tensor, classes: list[str], domain: Domain) -> dict[str, int]:
    """FLOPs of one inference of `image`, in total ("Global") and per module type ("ResidualAttentionBlock.attn").

    The classes' text anchors are computed first and not counted: they depend only on the class
    names, and a deployed model computes them once, not per image. FlopCounterMode does not see
    fused kernels, so torch's MultiheadAttention fast path and the fused scaled-dot-product
    attention would drop attention from the count (ViT-L-14-336 at 518 px: 791 G instead of the
    full count); both run in their decomposed forms while counting, which give the same outputs.
    """
    model.predict(image, classes, domain)  # fills the text anchor cache
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.predict(image, classes, domain)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return {module: sum(by_op.values()) for module, by_op in counter.get_flop_counts().items()}


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

    flops = inference_flop_counts(model, image, classes, "industrial")["Global"]
    counts = {"params_m": model.parameter_counts()["total"] / 1e6, "flops_g": flops / 1e9}
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
