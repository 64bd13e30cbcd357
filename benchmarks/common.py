"""What the speed benchmarks share: model choice, environment, timing, peak memory, tables and JSON.

Every benchmark measures the fast path against the reference computation (REFERENCE in
moeclip.methods.execution: fp32, every expert, materialised attention) in the same process
on the same weights, so each ratio comes from one run on one machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from moeclip import ModelConfig, build_model
from moeclip.backbone import default_moe_layers
from moeclip.cost import synchronize
from moeclip.methods.moeclip import MoECLIP
from moeclip.methods.execution import REFERENCE, Execution, compile_backbone, fast_execution
from moeclip.bench.params import Profile, load_profile

ROOT = Path(__file__).resolve().parents[1]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--image-size", type=int, help="input side in px; default 518, or 64 with --tiny")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight test backbone (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="fast path precision; auto = bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the frozen blocks on the fast path")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20,
                        help="timed rounds per mode, the modes alternating; the best round counts")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")


@functools.cache
def paper_profile() -> Profile:
    """The paper profile of the repository's params.yaml: the settings every full-size benchmark uses
    (read once: a report asks for it several times)."""
    return load_profile(ROOT / "params.yaml", "paper")


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.tiny:  # the demo profile's network (params.yaml)
        demo = load_profile(ROOT / "params.yaml", "demo").model
        return demo.model_copy(update={"image_size": args.image_size or demo.image_size})
    paper = paper_profile().model
    return ModelConfig.model_validate({**paper.model_dump(), "backbone": args.backbone, "weights": None,
                                       "image_size": args.image_size or paper.image_size,
                                       "moe_layers": default_moe_layers(args.backbone)})


def fast_mode(args: argparse.Namespace, device: torch.device) -> Execution:
    if args.precision == "auto":
        return fast_execution(device)
    return Execution(bf16=args.precision == "bf16")


def build_randomised(config: ModelConfig, seed: int, device: torch.device) -> MoECLIP:
    """Random weights, with the zero-initialised trainables randomised too, so that every expert and
    head contributes (at initialisation LoRA B = 0 and the experts add nothing)."""
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.to(device).eval()


def contenders(config: ModelConfig, args: argparse.Namespace,
               device: torch.device) -> dict[str, tuple[MoECLIP, Execution]]:
    """The reference and the fast path, each with its own copy of the same weights (the fast
    one compiled if asked), so that they can alternate. Models come in eval mode."""
    fast_model = build_randomised(config, args.seed, device)
    if args.compile:
        compile_backbone(fast_model, **({"mode": args.compile_mode} if args.compile_mode else {}))
    return {"reference": (build_randomised(config, args.seed, device), REFERENCE),
            "fast": (fast_model, fast_mode(args, device))}


def environment(device: torch.device) -> dict[str, Any]:
    """Device and software versions, recorded in every report."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type, "device_name": name, "torch": torch.__version__, "open_clip": open_clip.__version__,
        "python": sys.version.split()[0], "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
    }


def _cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def modes(fast: Execution) -> dict[str, dict[str, bool]]:
    return {"reference": dataclasses.asdict(REFERENCE), "fast": dataclasses.asdict(fast)}


def best_seconds(calls: dict[str, Callable[[], Any]], device: torch.device, warmup: int, iters: int,
                 rounds: int) -> dict[str, float]:
    """Per contender, the best over `rounds` of the mean wall time of `iters` calls.

    After `warmup` untimed calls each (compilation, caches), the contenders alternate round
    by round, so background load on a shared machine hits them alike; the best round is the
    least disturbed one.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                call()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / iters)
    return best


def measured_alone(models: dict[str, tuple[MoECLIP, Execution]], name: str, call: Callable[[], Any],
                   device: torch.device) -> tuple[Any, float]:
    """The result of one call of mode `name` and its peak memory (MiB), with the other modes' models
    moved off the GPU meanwhile, so that only this mode's own weights count."""
    others = [model for other, (model, _) in models.items() if other != name and device.type == "cuda"]
    for model in others:
        model.to("cpu")
    try:
        with PeakMemory(device) as memory:
            result = call()
    finally:
        for model in others:
            model.to(device)
    return result, memory.mib


class PeakMemory:
    """Peak memory while the block runs, in MiB.

    CUDA: the peak of memory allocated by tensors (weights included). CPU: the process's
    resident set size, sampled every millisecond (the kernel's own peak only ever grows,
    so it cannot separate two measurements in one process; it includes both modes' models).
    The benchmarks measure it on a call of its own, since the sampling thread would
    disturb the timed calls.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_sampled"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        page = 4096
        while True:
            with open("/proc/self/statm") as statm:
                self.mib = max(self.mib, int(statm.read().split()[1]) * page / 2**20)
            if self._stop.wait(0.001):
                return


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """`columns`: (key, header, format spec); missing values print as '-'."""
    print(title)
    widths = [max(len(header), 10) for _, header, _ in columns]
    print("  ".join(header.rjust(width) for (_, header, _), width in zip(columns, widths)))
    for row in rows:
        cells = [format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns]
        print("  ".join(cell.rjust(width) for cell, width in zip(cells, widths)))


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Print the report as one JSON line (last line of stdout) and write it to `out` if given."""
    text = json.dumps(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(text)


def header(kind: str, config: ModelConfig, env: dict[str, Any], fast: Execution) -> str:
    return (f"{kind}: {config.backbone} @ {config.image_size}px on {env['device_name']} ({env['device']}), "
            f"torch {env['torch']}, open_clip {env['open_clip']}; fast = {dataclasses.asdict(fast)}")
