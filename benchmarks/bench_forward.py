"""Time one MoECLIP test-time forward (maps + scores) per batch size; print a table and JSON.

Random weights are enough for timing. The frozen backbone's attention goes through
torch.nn.MultiheadAttention with need_weights=False, which dispatches to the fused
scaled_dot_product_attention kernels.

    python benchmarks/bench_forward.py --backbone ViT-L-14-336 --image-size 518 --device cuda --dtype bf16
    python benchmarks/bench_forward.py --tiny            # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from moeclip import ModelConfig, build_model
from moeclip.backbone import default_moe_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--tiny", action="store_true", help="the tiny demo backbone at 64 px")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """Peak CUDA allocation for GPUs; peak process RSS (includes the weights) on the CPU."""
    if device.type == "cuda":
        return "peak_cuda_allocated_mb", torch.cuda.max_memory_allocated(device) / 2**20
    return "peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_batch(model, batch: int, size: int, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    descriptions = ["object"] * batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for _ in range(warmup):
            model.predict(images, descriptions, "industrial")
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model.predict(images, descriptions, "industrial")
        synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    memory_key, memory = peak_memory_mb(device)
    return {"batch": batch, "latency_ms": seconds * 1e3, "images_per_s": batch / seconds, memory_key: memory}


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.tiny:
        config = ModelConfig.tiny()
    else:
        config = ModelConfig(backbone=args.backbone, image_size=args.image_size, weights=None,
                             moe_layers=default_moe_layers(args.backbone))
    model = build_model(config, seed=0).to(device=device, dtype=dtype).eval()
    rows = [time_batch(model, int(b), config.image_size, device, dtype, args.warmup, args.iters)
            for b in args.batch_sizes.split(",")]
    report = {
        "backbone": config.backbone, "image_size": config.image_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "params": model.parameter_counts(), "results": rows,
    }
    print(f"{config.backbone} @ {config.image_size}px on {report['device_name'] or device} ({args.dtype})")
    print(f"{'batch':>6} {'latency ms':>11} {'images/s':>9} {'peak MB':>9}")
    for row in rows:
        print(f"{row['batch']:>6} {row['latency_ms']:>11.1f} {row['images_per_s']:>9.2f} {list(row.values())[-1]:>9.0f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
