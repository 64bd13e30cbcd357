"""Benchmark exact pixel AUROC/AP: scikit-learn versus moeclip.metrics.

Random float32 pixel scores rounded to 1e-4 (so heavily tied), ~3 % positives scoring
higher on average. Each method runs in a forked child so that its peak RSS increase and
tracemalloc peak (NumPy allocations are traced) are its own. Prints JSON, then a table.

    python benchmarks/bench_metrics.py --n 10_000_000 100_000_000 --sklearn-max-n 100_000_000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from moeclip.metrics import PixelMetricAccumulator, ranking_metrics

_PAGE = resource.getpagesize()
_IMAGE = 518 * 518


def make_data(n: int, positive_rate: float, decimals: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores in [0, 1.5] rounded to ``decimals`` (negative: not rounded) and bool labels."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n, dtype=np.float32) < positive_rate
    scores = rng.random(n, dtype=np.float32)
    scores[labels] += np.float32(0.5)
    return (np.round(scores, decimals) if decimals >= 0 else scores), labels


def run_sklearn(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"auroc": roc_auc_score(labels, scores), "ap": average_precision_score(labels, scores)}


def run_one_shot(scores: Any, labels: Any) -> dict[str, float]:
    return ranking_metrics(scores, labels)


def run_streaming(scores: Any, labels: Any, batch: int = 8 * _IMAGE) -> dict[str, float]:
    """Feed the accumulator batches of eight 518x518 maps, as the evaluator would."""
    acc = PixelMetricAccumulator()
    for start in range(0, len(scores), batch):
        acc.update(scores[start : start + batch], labels[start : start + batch])
    return acc.compute()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _measure(fn: Callable[..., dict], args: tuple) -> dict[str, float]:
    """Seconds, peak RSS increase, tracemalloc peak (and CUDA peak) of ``fn(*args)``."""
    base_rss = _rss_bytes()
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = {"cuda_peak_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_initialized() else {}
    metrics = {k: float(result[k]) for k in ("auroc", "ap")}
    return {"seconds": seconds, "peak_rss_increase_bytes": peak_rss - base_rss, "tracemalloc_peak_bytes": traced_peak, **metrics, **extra}


def _measure_child(fn: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    queue.put(_measure(fn, args))


def measure(fn: Callable[..., dict], *args: Any) -> dict[str, float]:
    """Measure ``fn(*args)`` in a forked child (inputs shared, not copied) so that peaks are its own.

    CUDA cannot be used in a forked child, so GPU runs are measured in-process (their RSS
    figure then also contains earlier peaks).
    """
    if torch.cuda.is_initialized():
        return _measure(fn, args)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure_child, args=(fn, args, queue))
    child.start()
    report = queue.get()
    child.join()
    return report


def bench(n: int, args: argparse.Namespace) -> dict[str, Any]:
    scores, labels = make_data(n, args.positive_rate, args.decimals)
    device = args.device
    row: dict[str, Any] = {"n": n, "positive_rate": args.positive_rate, "decimals": args.decimals, "device": device}
    row["distinct_scores"] = int(np.unique(scores).size)
    fast_args = (scores, labels)
    if device != "cpu":
        fast_args = (torch.from_numpy(scores).to(device), torch.from_numpy(labels).to(device))
    row["one_shot"] = measure(run_one_shot, *fast_args)
    row["streaming"] = measure(run_streaming, *fast_args)
    if n <= args.sklearn_max_n:
        row["sklearn"] = measure(run_sklearn, scores, labels)
        for name in ("one_shot", "streaming"):
            diffs = [abs(row[name][k] - row["sklearn"][k]) for k in ("auroc", "ap")]
            row[name]["max_abs_diff_vs_sklearn"] = max(diffs)
            row[name]["speedup_vs_sklearn"] = row["sklearn"]["seconds"] / row[name]["seconds"]
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'n':>12} {'distinct':>10} {'method':>10} {'seconds':>9} {'speedup':>8} {'RSS+ MiB':>9} {'traced MiB':>10} {'|diff|':>9}"
    print(header)
    for row in rows:
        for name in ("sklearn", "one_shot", "streaming"):
            if name not in row:
                continue
            r = row[name]
            speed = f"{r['speedup_vs_sklearn']:.1f}x" if "speedup_vs_sklearn" in r else "-"
            diff = f"{r['max_abs_diff_vs_sklearn']:.1e}" if "max_abs_diff_vs_sklearn" in r else "-"
            print(
                f"{row['n']:>12} {row['distinct_scores']:>10} {name:>10} {r['seconds']:>9.2f} {speed:>8} "
                f"{r['peak_rss_increase_bytes'] / 2**20:>9.0f} {r['tracemalloc_peak_bytes'] / 2**20:>10.0f} {diff:>9}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=lambda s: int(float(s)), nargs="+", default=[100_000_000])
    parser.add_argument("--positive-rate", type=float, default=0.03)
    parser.add_argument("--decimals", type=int, default=4, help="round scores (ties); -1: no rounding")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fast path only)")
    parser.add_argument("--sklearn-max-n", type=lambda s: int(float(s)), default=100_000_000)
    args = parser.parse_args()
    rows = [bench(n, args) for n in args.n]
    print(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
