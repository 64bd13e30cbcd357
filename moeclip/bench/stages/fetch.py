"""Stage `fetch@<dataset>`: the raw dataset folder (downloaded, found in place, or synthesised)."""
from __future__ import annotations

from pathlib import Path

import moeclip.data.fetch  # noqa: F401 - imported by the job below when it runs: the stage's code
import moeclip.data.synthetic  # noqa: F401
from moeclip.bench.experiments import load_plan
from moeclip.bench.workflows import fetch_profile_dataset


def run(params: Path, dataset: str, profile_name: str | None = None) -> Path:
    _, profile = load_plan(params, profile_name)
    return fetch_profile_dataset(profile, dataset)
