"""When a stage task may reuse its cached result instead of running again.

The key of a stage call hashes:
  - the stage and its arguments (params path, dataset / auxiliary / target / experiment, profile),
  - the working directory (every stage path is relative to it),
  - the params file's content (any edit of params.yaml invalidates every stage: conservative,
    and cheap because the stages themselves redo only what changed),
  - the moeclip package's source (a code change invalidates every stage, for the same reason),
  - size and modification time of every file the stage reads, as dvc.yaml declares them (a
    re-prepared manifest or a retrained checkpoint invalidates what was computed from it).
The flow runs a call whose outputs are missing on disk even when its key has a cached result
(`outputs_exist`, Prefect's `refresh_cache`), so a cached result never stands in for a deleted
output; only a stage writes its outputs, so checking before the run is enough. The flow's
`refresh` parameter re-runs every stage regardless. Either way the new result is stored.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

import moeclip
from moeclip.data.archive import file_sha256
from moeclip.bench.experiments import Benchmark, load_plan
from moeclip.bench.params import Profile
from pipelines.plan import analysis_datasets, experiment_datasets

CODE_SUFFIXES = (".py", ".json", ".yaml")


def stage_files(stage: str, benchmark: Benchmark, profile: Profile,
                args: dict[str, Any]) -> tuple[list[Path], list[Path]]:
    """(files read, files written) by one stage call, as dvc.yaml declares them."""
    if stage == "fetch":
        return [], [profile.layout.raw(args["dataset"])]
    if stage == "prepare":
        return [profile.layout.raw(args["dataset"])], [profile.layout.manifest(args["dataset"])]
    if stage == "train":
        return [profile.layout.manifest(args["auxiliary"])], [profile.layout.training(args["auxiliary"])]
    if stage == "evaluate":
        auxiliary, target = args["auxiliary"], args["target"]
        return [profile.layout.checkpoint(auxiliary), profile.layout.manifest(target)], \
            [profile.layout.evaluation(auxiliary, target), profile.layout.evaluation_metrics(auxiliary, target)]
    if stage == "experiment":
        experiment = args["experiment"]
        reads = [*(profile.layout.checkpoint(a) for a in benchmark.main.targets),
                 *(profile.layout.manifest(d) for d in sorted(experiment_datasets(benchmark, profile, experiment)))]
        return reads, [profile.layout.experiment(experiment), profile.layout.experiment_metrics(experiment),
                       profile.layout.experiment_resources(experiment)]
    if stage == "analysis":
        reads = [profile.layout.checkpoint(benchmark.main.auxiliary),
                 *(profile.layout.manifest(d) for d in sorted(analysis_datasets(benchmark, profile)))]
        return reads, [profile.layout.analysis()]
    if stage == "report":
        return [profile.layout.metrics(), profile.layout.resources(), profile.layout.analysis()], \
            [profile.layout.reports]
    raise ValueError(f"no stage '{stage}'")


def fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of a file or of every file under a folder; empty when missing. Cheap: no reads."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def code_digest() -> str:
    """Digest of the moeclip package's source and bundled configs."""
    root = Path(moeclip.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def outputs_exist(stage: str, benchmark: Benchmark, profile: Profile, args: dict[str, Any]) -> bool:
    """Whether everything the stage call writes is on disk."""
    return all(path.exists() for path in stage_files(stage, benchmark, profile, args)[1])


@dataclass
class StageCache(CachePolicy):
    """The cache policy of one stage (see the module docstring)."""

    stage: str = ""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        params = Path(inputs["params"])
        benchmark, profile = load_plan(params, inputs["profile_name"])
        reads, _ = stage_files(self.stage, benchmark, profile, inputs)
        return hash_objects(self.stage, {name: str(value) for name, value in inputs.items()}, str(Path.cwd().resolve()),
                            file_sha256(params), code_digest(),
                            [fingerprint(path) for path in reads], raise_on_failure=True)
