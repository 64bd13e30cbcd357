"""Stage `code`: each other stage's code stamp, the package files it imports and their digest.

A stage depends on its stamp rather than on its files, so dvc.lock keeps one code entry per stage, yet
an edit reruns exactly the stages whose files it changed: a stamp whose files are unchanged is
rewritten with the same bytes, and DVC sees nothing to do downstream.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moeclip.bench.dvcfile import PACKAGE_ROOT, stage_code
from moeclip.bench.experiments import load_plan
from moeclip.bench.stages import CODE_STAGE, STAGES
from moeclip.bench.stages.common import code_digest, write_json


def run(params: Path, profile_name: str | None = None) -> Path:
    _, profile = load_plan(params, profile_name)
    stamped = [stage for stage in STAGES if stage.name != CODE_STAGE]
    with ThreadPoolExecutor() as pool:  # each probe is a fresh interpreter importing one stage
        files = list(pool.map(stage_code, stamped))
    for stage, code in zip(stamped, files):
        write_json(profile.layout.code(stage.name), {"files": code, "digest": code_digest(PACKAGE_ROOT, code)})
    return profile.layout.code(CODE_STAGE).parent
