"""Stage `code`: each other stage's code stamp, the package files it imports and their digest.

A stage depends on its stamp rather than on its files, so dvc.lock keeps one code entry per stage, yet
an edit reruns exactly the stages whose files it changed: a stamp whose content is unchanged is not
rewritten, so neither DVC nor the Prefect flow's cache keys see anything new downstream.
"""
from __future__ import annotations

import json
from pathlib import Path

from moeclip.bench.dvcfile import PACKAGE_ROOT, stages_code
from moeclip.bench.experiments import load_plan
from moeclip.bench.stages import CODE_STAGE, STAGES
from moeclip.bench.stages.common import code_digest, write_json


def run(params: Path, profile_name: str | None = None) -> Path:
    _, profile = load_plan(params, profile_name)
    for name, files in stages_code([stage for stage in STAGES if stage.name != CODE_STAGE]).items():
        stamp, path = {"files": files, "digest": code_digest(PACKAGE_ROOT, files)}, profile.layout.code(name)
        if not path.is_file() or json.loads(path.read_text()) != stamp:
            write_json(path, stamp)
    return profile.layout.code(CODE_STAGE).parent
