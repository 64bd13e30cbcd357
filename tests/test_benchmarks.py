"""The benchmark scripts run at tiny size on the CPU, print parseable JSON and feed the performance report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


SMOKE = {  # tiny model on the CPU, one timed call each: the CI smoke run
    "inference": ["--batch-sizes", "1,2"],
    "train": ["--max-batch", "4"],
    "eval": ["--images", "8", "--batch-size", "4"],
}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=300)


@pytest.fixture(scope="module")
def smoke_reports(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path_factory.mktemp("cpu-tiny")
    reports = {}
    for name, args in SMOKE.items():
        extra = [] if name == "eval" else ["--warmup", "0", "--iters", "1"]
        completed = _run(f"benchmarks.bench_{name}", "--tiny", "--device", "cpu", "--rounds", "1",
                         "--out", str(folder / f"{name}.json"), *args, *extra)
        reports[name] = json.loads(completed.stdout.strip().splitlines()[-1])
        assert reports[name] == json.loads((folder / f"{name}.json").read_text())
        assert "x reference" in completed.stdout  # the table
    return folder, reports


def test_benchmarks_compare_fast_and_reference_modes(smoke_reports):
    _, reports = smoke_reports
    for report in reports.values():
        assert report["environment"]["device"] == "cpu" and report["environment"]["torch"] == torch.__version__
        assert report["modes"]["reference"] == {"bf16": False, "sparse_experts": False, "fused_attention": False}
        assert {row["mode"] for row in report["rows"]} == {"reference", "fast"}
        assert all(row["images_per_s"] > 0 and row["peak_memory_mib"] > 0 for row in report["rows"])
        assert all(row["speedup"] > 0 for row in report["rows"] if row["mode"] == "fast")
    assert [(r["mode"], r["batch"]) for r in reports["inference"]["rows"]] == [
        ("reference", 1), ("fast", 1), ("reference", 2), ("fast", 2)]
    assert all(r["max_map_diff"] < 1e-4 for r in reports["inference"]["rows"] if r["mode"] == "fast")
    assert [(r["batch"], r.get("largest", False)) for r in reports["train"]["rows"] if r["mode"] == "fast"] == [
        (2, False), (4, True)]
    assert reports["eval"]["rows"][1]["max_metric_diff_points"] < 0.1


def test_report_renders_the_tables_and_the_paper_profile_estimate(smoke_reports, tmp_path):
    folder, reports = smoke_reports
    out = tmp_path / "performance.md"
    _run("benchmarks.report", str(folder), "--out", str(out))
    text = out.read_text()
    assert "CPU numbers of the tiny test model" in text and "No GPU measurement yet" in text
    assert "### Training step" in text and "### Evaluation" in text and "### Inference" in text
    train = next(r for r in reports["train"]["rows"] if r["mode"] == "fast" and r["batch"] == 2)["images_per_s"]
    evaluation = reports["eval"]["rows"][1]["images_per_s"]
    assert f"| {train:.1f} | {evaluation:.1f} |" in text
    # 20 epochs over the VisA (2,162) and MVTec-AD (1,725) test sets; the 14 test sets hold 14,127 images
    assert "77,740 training images" in text and "14,127 images" in text


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


def test_committed_performance_report_is_generated_from_the_committed_json(tmp_path):
    folders = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "reports" / "benchmarks").iterdir() if p.is_dir())
    out = tmp_path / "performance.md"
    _run("benchmarks.report", *folders, "--out", str(out))
    assert out.read_text() == (ROOT / "reports" / "performance.md").read_text()
