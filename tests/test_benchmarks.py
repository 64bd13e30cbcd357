"""The benchmark scripts run at tiny size on the CPU and print parseable JSON (CI smoke run)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_forward_benchmark_smoke_run():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_forward.py"), "--tiny", "--device", "cpu",
         "--batch-sizes", "1,2", "--warmup", "0", "--iters", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert [row["batch"] for row in report["results"]] == [1, 2]
    assert all(row["images_per_s"] > 0 and row["peak_rss_mb"] > 0 for row in report["results"])
    assert report["params"]["total"] == report["params"]["backbone"] + report["params"]["added"]


def test_metrics_benchmark_smoke_run_agrees_with_sklearn():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_metrics.py"), "--n", "20000"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    json_text = completed.stdout[: completed.stdout.rindex("]") + 1]
    (row,) = json.loads(json_text)
    for method in ("one_shot", "streaming"):
        assert row[method]["max_abs_diff_vs_sklearn"] < 1e-9
        assert abs(row[method]["auroc"] - row["sklearn"]["auroc"]) < 1e-9
