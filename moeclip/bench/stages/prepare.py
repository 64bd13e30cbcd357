"""Stage `prepare@<dataset>`: the validated manifest of one fetched dataset."""
from __future__ import annotations

from pathlib import Path

import moeclip.data.prepare  # noqa: F401 - imported by the job below when it runs: the stage's code
from moeclip.bench.experiments import load_plan
from moeclip.bench.workflows import prepare_profile_dataset


def run(params: Path, dataset: str, profile_name: str | None = None) -> Path:
    _, profile = load_plan(params, profile_name)
    return prepare_profile_dataset(profile, dataset)
