"""What every stage shares: its plan (with the runtime pinned for computing stages), JSON outputs, usage records."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moeclip.atomic import write_text_atomically
from moeclip.bench.experiments import Benchmark, load_plan
from moeclip.bench.params import Profile
from moeclip.resources import Usage

# The metrics the stages' metric files keep: the paper's four and AUPRO, five columns that
# `dvc metrics show` prints within 120 characters. Every evaluation's summary.json has them all.
STAGE_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")


def computing_plan(params: Path, profile_name: str | None) -> tuple[Benchmark, Profile]:
    """The plan of a stage that computes with torch, after pinning the profile's runtime (threads, kernels)."""
    from moeclip.runtime import pin_runtime

    benchmark, profile = load_plan(params, profile_name)
    pin_runtime(profile.runtime.threads, profile.runtime.deterministic)
    return benchmark, profile


def write_json(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2, sort_keys=False, allow_nan=True) + "\n")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def summary_values(summary) -> dict[str, dict[str, float]]:
    """An evaluation summary frame as {dataset: {metric: value}} of the STAGE_METRICS a dataset has."""
    return {dataset: {metric: float(value) for metric, value in row.dropna().items() if metric in STAGE_METRICS}
            for dataset, row in summary.iterrows()}


def record_usage(params: Path, profile_name: str | None, label: str, usage: Usage, code: list[str]) -> None:
    """Keep a stage call's wall time, peak memory and the package files it ran (runs/<profile>/usage/)."""
    _, profile = load_plan(params, profile_name)
    write_json(profile.layout.usage(label), {**usage.as_dict(), "code": code})


PACKAGE_FOLDER = Path(__file__).resolve().parents[2]  # moeclip/


def code_digest(root: Path, paths: tuple[str, ...] | list[str]) -> str:
    """A digest of the files at `paths` under `root` (folders: all their files, recursively, bytecode caches
    aside): names and contents."""
    hashed = hashlib.sha256()
    for path in paths:
        folder = root / path
        files = sorted(file for file in folder.rglob("*") if file.is_file() and "__pycache__" not in file.parts) \
            if folder.is_dir() else [folder]
        for file in files:
            hashed.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return hashed.hexdigest()[:16]
