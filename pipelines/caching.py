"""When a stage task may reuse its cached result instead of running again.

The key of a stage call hashes what its declaration (moeclip/bench/stages/) says it depends on:
  - the stage, its arguments (params path, dataset / auxiliary / target / experiment, profile) and
    the working directory (every stage path is relative to it),
  - the values of the params.yaml keys the stage declares (as DVC tracks them),
  - its code, through the stamp it reads (written by the `stamps` stage, moeclip/bench/stages/stamps.py),
  - size and modification time of every file it reads (a re-prepared manifest or a retrained
    checkpoint invalidates what was computed from it).
The flow runs a call whose outputs are missing on disk even when its key has a cached result
(`outputs_exist`, Prefect's `refresh_cache`), so a cached result never stands in for a deleted
output; only a stage writes its outputs, so checking before the run is enough. The flow's
`refresh` parameter re-runs every stage regardless. Either way the new result is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from moeclip.bench.experiments import Benchmark, load_plan
from moeclip.bench.params import Profile, params_values, read_params
from moeclip.bench.stages import Stage, get_stage


def fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of a file or of every file under a folder (bytecode caches aside, as DVC ignores them);
    empty when missing. Cheap: no reads."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() \
        else [path] if path.is_file() else []
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def outputs_exist(stage: Stage, benchmark: Benchmark, profile: Profile, args: dict[str, str]) -> bool:
    """Whether everything the stage call writes is on disk."""
    return all(path.exists() for path in stage.paths(profile.layout, benchmark, args)[1])


@dataclass
class StageCache(CachePolicy):
    """The cache policy of one stage (see the module docstring)."""

    stage: str = ""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        stage = get_stage(self.stage)
        params = Path(inputs["params"])
        benchmark, profile = load_plan(params, inputs["profile_name"])
        args = {name: inputs[name] for name in stage.arguments}
        reads, _ = stage.paths(profile.layout, benchmark, args)
        values = params_values(read_params(params), stage.params_keys(profile.name, args))
        return hash_objects(self.stage, {name: str(value) for name, value in inputs.items()}, str(Path.cwd().resolve()),
                            values, [fingerprint(path) for path in reads], raise_on_failure=True)
