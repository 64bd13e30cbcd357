"""Training-step benchmark: the paper's losses, backward and Adam step, fast path versus reference.

Measured at batch 2 (the paper's) and at the largest batch that fits: batches double from 4
until a mode runs out of memory or `--max-batch` is reached (on the CPU only the latter
stops it, so there it is the largest batch tried). Random weights, one copy per mode,
synthetic batches: the step's cost does not depend on the values. At each batch size the
two modes alternate (see `best_seconds`).

    python -m benchmarks.bench_train                          # ViT-L-14-336 at 518 px (GPU)
    python -m benchmarks.bench_train --tiny --max-batch 8 --out reports/benchmarks/cpu-tiny/train.json
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    PeakMemory,
    add_common_arguments,
    best_seconds,
    contenders,
    emit,
    environment,
    header,
    measured_alone,
    model_config,
    modes,
    paper_profile,
    print_table,
)
from moeclip.methods.moeclip import MoECLIP
from moeclip.methods.execution import Execution
from moeclip.training import build_optimizer, train_step


def synthetic_batch(batch: int, size: int, device: torch.device) -> dict[str, Any]:
    """Random images, a square defect mask on every other image, and the matching labels (pinned on CUDA)."""
    generator = torch.Generator().manual_seed(batch)
    masks = torch.zeros(batch, 1, size, size)
    masks[1::2, :, size // 4:size // 2, size // 4:size // 2] = 1
    tensors = {"image": torch.randn(batch, 3, size, size, generator=generator), "mask": masks,
               "label": (torch.arange(batch) % 2).long()}
    if device.type == "cuda":
        tensors = {key: value.pin_memory() for key, value in tensors.items()}
    return {**tensors, "has_mask": [True] * batch, "description": ["object"] * batch, "class_name": ["object"] * batch}


def stepper(model: MoECLIP, how: Execution, batch_size: int) -> Callable[[], dict[str, float]]:
    """One training step (losses, backward, Adam) at `batch_size`, with its own optimiser."""
    device = next(model.parameters()).device
    config = paper_profile().train.model_copy(update={"batch_size": batch_size})
    optimizer, scheduler = build_optimizer(model, config, device)
    batch = synthetic_batch(batch_size, model.config.image_size, device)
    return lambda: train_step(model, optimizer, scheduler, batch, device, how)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=1, help="calls per timed round")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = model_config(args)
    models = contenders(config, args, device)
    fitting = dict(models)
    rows = []
    batch = 2
    while fitting and batch <= args.max_batch:
        calls = {}
        for name, (model, how) in list(fitting.items()):
            call = stepper(model, how, batch)
            try:
                call()
                calls[name] = call
            except torch.OutOfMemoryError:
                del fitting[name]
                torch.cuda.empty_cache()
        seconds = best_seconds(calls, device, args.warmup, args.iters, args.rounds)
        for name, call in calls.items():
            memory = measured_alone(models, name, call, device)[1]
            rows.append({"mode": name, "batch": batch, "images_per_s": batch / seconds[name],
                         "step_ms": seconds[name] * 1e3, "peak_memory_mib": memory})
        if len(calls) == 2:
            rows[-1]["speedup"] = seconds["reference"] / seconds["fast"]
        batch = 4 if batch == 2 else batch * 2
    largest = {row["mode"]: row for row in rows}  # the last row of each mode
    for row in largest.values():
        row["largest"] = True
    env, fast = environment(device), models["fast"][1]
    report = {
        "benchmark": "train", "backbone": config.backbone, "image_size": config.image_size, "environment": env,
        "modes": modes(fast), "compiled": args.compile, "compile_mode": args.compile_mode,
        "memory": PeakMemory(device).kind, "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds,
        "max_batch": args.max_batch, "params": models["fast"][0].parameter_counts(), "rows": rows,
        "largest_fast_over_largest_reference": (largest["fast"]["images_per_s"] / largest["reference"]["images_per_s"]
                                                if len(largest) == 2 else None),
    }
    print_table(header("training step", config, env, fast), rows, [
        ("mode", "mode", ""), ("batch", "batch", "d"), ("images_per_s", "images/s", ".1f"),
        ("step_ms", "step ms", ".1f"),
        ("peak_memory_mib", "peak MiB", ".0f"), ("speedup", "x reference", ".2f"), ("largest", "largest", ""),
    ])
    emit(report, args.out)


if __name__ == "__main__":
    main()
