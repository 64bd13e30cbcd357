"""Evaluation benchmark: images/s of `evaluate_frame` end to end, fast path versus reference.

Includes everything a real evaluation does: PNG decoding and resizing in the DataLoader,
the forward, per-class normalisation and all metrics (image and pixel AUROC/AP/F1-max,
AUPRO). The images are written once to a temporary folder: smooth random colour fields at
`--source-size` px, half of them with a square defect and its mask, in two classes. The
metrics of both modes are reported with their largest difference, in points (x100).

    python -m benchmarks.bench_eval --images 512 --batch-size 32 --source-size 1024   # GPU, MVTec-like sizes
    python -m benchmarks.bench_eval --tiny --images 32 --out reports/benchmarks/cpu-tiny/eval.json
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

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
from moeclip.evaluation import METRICS, evaluate_frame
from moeclip.methods.moeclip import MoECLIP
from moeclip.methods.execution import Execution


def write_images(folder: Path, count: int, size: int, seed: int) -> pd.DataFrame:
    """`count` test images in two classes (every other one anomalous, with a mask), as a manifest frame."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((size, size), Image.BICUBIC)).copy()
        label = index % 2
        mask_path = None
        if label:
            mask = np.zeros((size, size), np.uint8)
            top, left = rng.integers(0, size * 3 // 4, 2)
            mask[top:top + size // 8, left:left + size // 8] = 255
            image[mask > 0] = rng.integers(0, 256, 3, dtype=np.uint8)
            mask_path = folder / f"{index}_mask.png"
            Image.fromarray(mask).save(mask_path)
        image_path = folder / f"{index}.png"
        Image.fromarray(image).save(image_path)
        class_name = "first" if index < count // 2 else "second"
        rows.append(dict(image_path=str(image_path), mask_path=None if mask_path is None else str(mask_path),
                         label=label, class_name=class_name, description=class_name, dataset="synthetic",
                         domain="industrial"))
    return pd.DataFrame(rows)


def evaluator(model: MoECLIP, how: Execution, frame: pd.DataFrame, args: argparse.Namespace,
              device: torch.device) -> Callable[[], pd.DataFrame]:
    """One whole evaluation of `frame` (per-class metrics) computed as `how` says."""
    return lambda: evaluate_frame(model, frame, batch_size=args.batch_size, device=device,
                                  num_workers=args.workers, execution=how).per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source-size", type=int, help="side of the written images; default: the model's input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="DataLoader workers; default: one per spare core on CUDA, 0 on CPU")
    parser.set_defaults(rounds=3)  # each round is a whole evaluation
    args = parser.parse_args()
    device = torch.device(args.device)
    config = model_config(args)
    models = contenders(config, args, device)
    with tempfile.TemporaryDirectory() as folder:
        frame = write_images(Path(folder), args.images, args.source_size or config.image_size, args.seed)
        warm_up = {name: evaluator(model, how, frame.iloc[:args.batch_size], args, device)
                   for name, (model, how) in models.items()}
        for call in warm_up.values():  # kernels, caches, compilation
            call()
        calls = {name: evaluator(model, how, frame, args, device) for name, (model, how) in models.items()}
        seconds = best_seconds(calls, device, warmup=0, iters=1, rounds=args.rounds)
        rows = []
        for name, call in calls.items():
            per_class, memory = measured_alone(models, name, call, device)
            rows.append({"mode": name, "images": len(frame), "batch": args.batch_size,
                         "images_per_s": len(frame) / seconds[name], "seconds": seconds[name],
                         "peak_memory_mib": memory, "metrics": (per_class[list(METRICS)].mean() * 100).to_dict()})
    metrics = {row["mode"]: row["metrics"] for row in rows}
    rows[-1].update(speedup=seconds["reference"] / seconds["fast"],
                    max_metric_diff_points=max(abs(metrics["fast"][k] - metrics["reference"][k]) for k in METRICS))
    env, fast = environment(device), models["fast"][1]
    report = {
        "benchmark": "eval", "backbone": config.backbone, "image_size": config.image_size, "environment": env,
        "modes": modes(fast), "compiled": args.compile, "compile_mode": args.compile_mode,
        "memory": PeakMemory(device).kind, "rounds": args.rounds, "source_size": args.source_size or config.image_size,
        "workers": args.workers, "params": models["fast"][0].parameter_counts(), "rows": rows,
    }
    print_table(header("evaluation (data loading + forward + metrics)", config, env, fast), rows, [
        ("mode", "mode", ""), ("images", "images", "d"), ("batch", "batch", "d"), ("images_per_s", "images/s", ".1f"),
        ("seconds", "seconds", ".2f"), ("peak_memory_mib", "peak MiB", ".0f"), ("speedup", "x reference", ".2f"),
        ("max_metric_diff_points", "max |dmetric| pt", ".3f"),
    ])
    emit(report, args.out)


if __name__ == "__main__":
    main()
