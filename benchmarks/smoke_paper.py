"""The paper profile at its real size, end to end, before a real paper run: `make smoke-paper`.

Runs `dvc repro` with the `paper-smoke` profile of params.yaml (the paper's backbones, input
sizes and modules with random weights, one class per dataset at the real sets' image sizes,
one optimiser step per training) in a clone of the working tree, printing each stage's wall
time and peak memory as it ends. The clone (`.smoke/clone`) is kept, so a second run is a
no-op unless code or params changed. Then every stage and every experiment variant of the
plan is checked for its record (parameter count, wall time, peak memory), and each baseline for its
parameter counts; the records are printed, and anything missing fails the run.

    .venv/bin/python -m benchmarks.smoke_paper [--folder .smoke] [--timeout 10800]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

from benchmarks.bench_pipeline import ROOT, clone_working_tree, run_repro
from moeclip.bench.experiments import Benchmark, experiment_runs, load_plan
from moeclip.bench.params import Profile
from moeclip.bench.stages import get_stage
from pipelines.plan import plan_stages

PROFILE = "paper-smoke"


def use_profile(params: Path, profile: str) -> None:
    """Point the params file's `profile:` line (what dvc.yaml reads) at `profile`."""
    text, count = re.subn(r"^profile: .*$", f"profile: {profile}", params.read_text(), count=1, flags=re.M)
    if count != 1:
        raise SystemExit(f"{params}: no top-level 'profile:' line to set")
    params.write_text(text)


def planned_stages(benchmark: Benchmark, profile: Profile) -> list[str]:
    """Every stage call the plan has, by its DVC name (as the declarations name them)."""
    return [get_stage(name).label(args) for name, args in plan_stages(benchmark, profile).calls(report=True)]


def stage_records(clone: Path, benchmark: Benchmark, profile: Profile) -> tuple[pd.DataFrame, list[str]]:
    """Each planned stage's wall time and peak memory, and the stages that left no record."""
    rows, missing = [], []
    for stage in planned_stages(benchmark, profile):
        record = clone / profile.layout.usage(stage)
        if record.is_file():
            usage = json.loads(record.read_text())
            rows.append({"stage": stage, **{key: value for key, value in usage.items() if key != "code"}})
        else:
            missing.append(f"stage {stage}")
    return pd.DataFrame(rows), missing


def variant_records(clone: Path, benchmark: Benchmark, profile: Profile) -> tuple[pd.DataFrame, list[str]]:
    """Each planned experiment variant's parameters, wall time and peak memory, and the variants without them."""
    rows, missing = [], []
    for experiment in benchmark.experiments:
        path = clone / profile.layout.experiment_resources(experiment)
        records = json.loads(path.read_text()) if path.is_file() else {}
        for run in experiment_runs(benchmark, profile, experiment):
            record = records.get(run.name, {})
            if record.get("params_m") is None or record.get("seconds") is None or record.get("peak_rss_gib") is None:
                missing.append(f"variant {experiment}/{run.name}")
            rows.append({"experiment": experiment, "variant": run.name, **record})
    return pd.DataFrame(rows), missing


def baseline_records(clone: Path, benchmark: Benchmark, profile: Profile) -> tuple[pd.DataFrame, list[str]]:
    """Each baseline's parameter counts (M) at the profile's size, and the baselines without them."""
    rows, missing = [], []
    for method in benchmark.methods:
        path = clone / profile.layout.baseline_resources(method)
        if path.is_file():
            rows.append({"method": method, **json.loads(path.read_text())})
        else:
            missing.append(f"baseline {method}")
    return pd.DataFrame(rows), missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=ROOT / ".smoke", help="where the clone is kept")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before `dvc repro` is stopped")
    args = parser.parse_args()
    clone = clone_working_tree(args.folder / "clone", leave_out=("reports/", "dvc.lock"))
    use_profile(clone / "params.yaml", PROFILE)
    print(f"dvc repro with profile {PROFILE} in {clone}", flush=True)
    repro = run_repro(clone, args.timeout, echo=True)
    if repro.returncode != 0:
        where = f" (stopped in {repro.timed_out_in})" if repro.timed_out_in else ""
        sys.exit(f"{repro.output[-4000:]}\ndvc repro failed{where} after {repro.seconds:.0f} s")
    benchmark, profile = load_plan(clone / "params.yaml", PROFILE)
    stages, missing_stages = stage_records(clone, benchmark, profile)
    variants, missing_variants = variant_records(clone, benchmark, profile)
    baselines, missing_baselines = baseline_records(clone, benchmark, profile)
    print(f"\n{len(repro.stages)} stages ran in {repro.seconds:.0f} s\n")
    print(stages.to_markdown(index=False, floatfmt=".2f"), "\n")
    print(variants.to_markdown(index=False, floatfmt=".2f"), "\n")
    print(baselines.to_markdown(index=False, floatfmt=".4f"), "\n")
    report = clone / profile.layout.reports / "README.md"
    missing = (missing_stages + missing_variants + missing_baselines
               + ([] if report.is_file() else [f"report {report}"]))
    if missing:
        sys.exit("missing: " + ", ".join(missing))
    print(f"every stage and all {len(variants)} variants complete; report: {report}")


if __name__ == "__main__":
    main()
