"""Stage `stamps`: each stage call's stamp, its code (the package files it imports and their digest) and its
settings (the values of the params.yaml keys it declares).

A call depends on its stamp rather than on its files and settings, so dvc.lock keeps one entry per call for
both, yet an edit reruns exactly the calls whose code or settings it changed: a stamp whose content is
unchanged is not rewritten, so neither DVC nor the Prefect flow's cache keys see anything new downstream.
The stage itself depends on the package and on the whole params.yaml (so `dvc params diff` and
`dvc exp run -S` see every setting); finding what each stage imports is done again only when the package
changed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeclip.bench.dvcfile import PACKAGE_ROOT, stages_code
from moeclip.bench.experiments import load_plan
from moeclip.bench.params import Profile, params_values, read_params
from moeclip.bench.stages import PACKAGE, STAGES, STAMP_STAGE, plan_calls
from moeclip.bench.stages.common import code_digest, write_json

CODE_CACHE = "_code.json"  # beside the stamps: the package's digest and each stage's code, found for it


def stage_code(profile: Profile) -> dict[str, dict[str, Any]]:
    """{stage: {"files", "digest"}} for every stage but this one; probed again only when the package changed."""
    package, cache = code_digest(PACKAGE_ROOT, [PACKAGE]), profile.layout.stamps() / CODE_CACHE
    if cache.is_file() and (cached := json.loads(cache.read_text()))["package"] == package:
        return cached["stages"]
    stages = {name: {"files": files, "digest": code_digest(PACKAGE_ROOT, files)}
              for name, files in stages_code([stage for stage in STAGES if stage.name != STAMP_STAGE]).items()}
    write_json(cache, {"package": package, "stages": stages})
    return stages


def call_stamps(params: Path, profile_name: str | None,
                code: Callable[[Profile], dict[str, dict[str, Any]]]) -> tuple[Profile, dict[str, dict]]:
    """The profile and {call label: its stamp} for every call of its plan, `code(profile)` giving each stage's
    code."""
    benchmark, profile = load_plan(params, profile_name)
    document, code_of = read_params(params), code(profile)
    stamps = {}
    for stage, args in plan_calls(benchmark):
        keys = stage.params_keys(profile.name, args)
        stamps[stage.label(args)] = {"code": code_of[stage.name], "params": dict(zip(keys, params_values(document, keys)))}
    return profile, stamps


def run(params: Path, profile_name: str | None = None) -> Path:
    profile, stamps = call_stamps(params, profile_name, stage_code)
    for label, stamp in stamps.items():
        path = profile.layout.stamp(label)
        if not path.is_file() or json.loads(path.read_text()) != stamp:
            write_json(path, stamp)
    for path in profile.layout.stamps().glob("*.json"):  # calls the plan no longer has
        if path.name != CODE_CACHE and path.stem not in stamps:
            path.unlink()
    return profile.layout.stamps()
