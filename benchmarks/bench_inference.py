"""Inference benchmark: test-time maps + scores per batch size, fast path versus reference, one process.

Random weights (timing does not depend on them), one copy per mode. For each batch size
the two modes alternate on the same input (see `best_seconds`); the largest difference of
their class-normalised maps and scores is reported next to the speed ratio.

    python -m benchmarks.bench_inference                     # ViT-L-14-336 at 518 px (GPU)
    python -m benchmarks.bench_inference --compile            # + torch.compile of the frozen blocks
    python -m benchmarks.bench_inference --tiny --batch-sizes 1,8 --out reports/benchmarks/cpu-tiny/inference.json
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

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
    print_table,
)
from moeclip.methods.moeclip import MoECLIP
from moeclip.methods.execution import Execution, executing
from moeclip.methods.scoring import per_class_protocol_scores


def predictor(model: MoECLIP, how: Execution, images: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A call of `model.predict` on `images` (maps, scores) computed as `how` says."""
    descriptions = ["object"] * images.shape[0]

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), executing(model, how, images.device.type):
            return model.predict(images, descriptions, "industrial")
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=1, help="calls per timed round")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = model_config(args)
    models = contenders(config, args, device)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        images = torch.randn(batch, 3, config.image_size, config.image_size,
                             generator=torch.Generator().manual_seed(batch)).to(device)
        calls = {name: predictor(model, how, images) for name, (model, how) in models.items()}
        seconds = best_seconds(calls, device, args.warmup, args.iters, args.rounds)
        normalised = {}
        for name, call in calls.items():
            outputs, memory = measured_alone(models, name, call, device)
            normalised[name] = per_class_protocol_scores(*outputs, "industrial")
            rows.append({"mode": name, "batch": batch, "images_per_s": batch / seconds[name],
                         "latency_ms": seconds[name] * 1e3, "peak_memory_mib": memory})
        rows[-1].update(
            speedup=seconds["reference"] / seconds["fast"],
            max_map_diff=float((normalised["fast"][0] - normalised["reference"][0]).abs().max()),
            max_score_diff=float((normalised["fast"][1] - normalised["reference"][1]).abs().max()),
        )
    env, fast = environment(device), models["fast"][1]
    report = {
        "benchmark": "inference", "backbone": config.backbone, "image_size": config.image_size,
        "environment": env, "modes": modes(fast), "compiled": args.compile, "compile_mode": args.compile_mode,
        "memory": PeakMemory(device).kind, "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds,
        "params": models["fast"][0].parameter_counts(), "rows": rows,
    }
    print_table(header("inference", config, env, fast), rows, [
        ("mode", "mode", ""), ("batch", "batch", "d"), ("images_per_s", "images/s", ".1f"),
        ("latency_ms", "latency ms", ".2f"), ("peak_memory_mib", "peak MiB", ".0f"), ("speedup", "x reference", ".2f"),
        ("max_map_diff", "max |dmap|", ".1e"), ("max_score_diff", "max |dscore|", ".1e"),
    ])
    emit(report, args.out)


if __name__ == "__main__":
    main()
