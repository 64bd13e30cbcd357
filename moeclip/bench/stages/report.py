"""Stage `report`: every table and figure, rendered from the stages' metric files."""
from __future__ import annotations

from pathlib import Path

from moeclip.bench.experiments import load_plan
from moeclip.bench.reports.render import render_reports


def run(params: Path, profile_name: str | None = None) -> Path:
    benchmark, profile = load_plan(params, profile_name)
    return render_reports(benchmark, profile)
