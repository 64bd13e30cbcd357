"""Stage `experiment@<name>`: train (or reuse) and evaluate every variant of one experiment; its metrics file.

The stage is idempotent: it re-trains only variants whose configuration or training code changed and
re-evaluates only what a changed checkpoint, setting or evaluation code affects, so a re-run after an
interruption or an edit redoes just the missing work.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import moeclip.bench.tracking  # noqa: F401 - imported by the training and evaluation jobs: the stage's code
import moeclip.evaluation  # noqa: F401
import moeclip.figures  # noqa: F401
import moeclip.training  # noqa: F401
from moeclip.bench.experiments import Benchmark, Run, experiment_runs, main_run
from moeclip.bench.layout import checkpoint_in
from moeclip.bench.params import Profile, RuntimeConfig
from moeclip.bench.stages import add_worker_code, imported_code
from moeclip.bench.stages.common import (PACKAGE_FOLDER, code_digest, computing_plan, digest, summary_values,
                                        write_json)
from moeclip.bench.stages.trained import ensure_trained, main_checkpoint, model_parameters
from moeclip.bench.workflows import evaluate_checkpoint, untrained_checkpoint
from moeclip.cost import measure_cost
from moeclip.data.archive import file_sha256
from moeclip.errors import MoeclipError
from moeclip.resources import measured
from moeclip.runtime import pin_runtime

# The code an experiment variant's evaluation results depend on: a change to any of them re-evaluates
# kept variants (a change elsewhere in the stage's code re-runs the stage, which keeps them).
EVALUATION_CODE = ("methods", "evaluation.py", "metrics", "cost.py", "checkpoint.py", "data/dataset.py",
                   "data/transforms.py")


@functools.cache
def _evaluation_code() -> str:
    return code_digest(PACKAGE_FOLDER, EVALUATION_CODE)


def variant_slug(name: str) -> str:
    """A folder name for a variant ('w/o FOFS & ETF Loss' -> 'w-o-fofs-etf-loss')."""
    return re.sub(r"[^a-z0-9.=]+", "-", name.lower()).strip("-") or "variant"


def _reused_main_training(benchmark: Benchmark, profile: Profile, run: Run) -> str | None:
    """The auxiliary dataset of the main training that is the same training as `run`, if there is one."""
    return next((auxiliary for auxiliary in benchmark.main.targets
                 if main_run(profile, auxiliary).training_key == run.training_key), None)


def _checkpoint_for(benchmark: Benchmark, profile: Profile, run: Run, folder: Path, experiment: str) -> Path:
    """Reuse a main training when the run is one; otherwise train (or build, if untrained) in `folder`.

    Trainings of earlier configurations of the variant are removed, so the folder holds only live work.
    """
    trainings = folder / "trainings"
    reused = _reused_main_training(benchmark, profile, run)
    _prune(trainings, {str(run.training_key)} if run.trained and not reused else set())
    if not run.trained:
        return untrained_checkpoint(run.model, profile.train.seed, folder / "untrained.pt")
    if reused:
        return main_checkpoint(profile, reused)
    return ensure_trained(profile, run, checkpoint_in(trainings / str(run.training_key)),
                          f"train/{experiment}/{run.name}", {"experiment": experiment, "variant": run.name}).checkpoint


def _evaluate_variant(profile: Profile, run: Run, checkpoint: Path, datasets: tuple[str, ...], folder: Path,
                      experiment: str, cost: bool) -> dict[str, dict[str, float]]:
    """A variant's per-dataset metrics (x100), re-evaluated only when its inputs changed."""
    manifests = {dataset: profile.layout.manifest(dataset) for dataset in datasets}
    key = digest({"checkpoint": file_sha256(checkpoint), "test_time": run.test_time, "code": _evaluation_code(),
                  "cost": cost and {"timing": profile.runtime.measure_time, "repeats": profile.runtime.timed_forwards},
                  "manifests": {name: file_sha256(path) for name, path in manifests.items()}})
    results_file = folder / f"{key}.json"
    if results_file.is_file():
        return json.loads(results_file.read_text())
    summary = evaluate_checkpoint(checkpoint, manifests, folder / "tables", profile.tracking, profile.device,
                                  profile.runtime.eval_batch_size,
                                  run_name=f"evaluate/{experiment}/{run.name}", test_time=run.test_time,
                                  tags={"experiment": experiment, "variant": run.name, "profile": profile.name})
    results = summary_values(summary)
    if cost:
        results["cost"] = measure_cost(checkpoint, run.test_time, profile.device, profile.runtime.measure_time,
                                       profile.runtime.timed_forwards)
    for old in folder.glob("*.json"):
        old.unlink()
    write_json(results_file, results)
    return results


def _variant_metrics(benchmark: Benchmark, profile: Profile, run: Run, folder: Path,
                     experiment: str) -> tuple[dict[str, dict[str, float]], dict[str, float | None]]:
    """One variant of an experiment: its checkpoint (reused, kept, resumed or trained), then its metrics,
    and its parameter counts with (where the profile measures time) its wall time and peak memory."""
    with measured() as usage:
        metrics = _variant_results(benchmark, profile, run, folder, experiment)
    resources = model_parameters(run.model)
    if profile.runtime.measure_time:
        resources |= usage[0].as_dict()
    return metrics, resources


def _variant_results(benchmark: Benchmark, profile: Profile, run: Run, folder: Path,
                     experiment: str) -> dict[str, dict[str, float]]:
    spec = benchmark.experiments[experiment]
    checkpoint = _checkpoint_for(benchmark, profile, run, folder, experiment)
    if not spec.cost:
        reused = _main_evaluation(benchmark, profile, run, spec.datasets)
        if reused is not None:
            shutil.rmtree(folder, ignore_errors=True)  # results of an earlier, own evaluation
            return reused
    return _evaluate_variant(profile, run, checkpoint, spec.datasets, folder, experiment, spec.cost)


def _main_evaluation(benchmark: Benchmark, profile: Profile, run: Run,
                     datasets: tuple[str, ...]) -> dict[str, dict[str, float]] | None:
    """The main results, when the variant is a main training evaluated as they were (same test-time settings).

    The default row of most experiments is exactly that; evaluating it again would give the same
    numbers (the evaluation is seeded) at the cost of a full pass over the test sets.
    """
    auxiliary = _reused_main_training(benchmark, profile, run)
    if auxiliary is None or run.test_time != main_run(profile, auxiliary).test_time or \
            not set(datasets) <= set(benchmark.main.targets[auxiliary]):
        return None
    files = [profile.layout.evaluation_metrics(auxiliary, dataset) for dataset in datasets]
    if not all(path.is_file() for path in files):
        return None
    return {dataset: json.loads(path.read_text()) for dataset, path in zip(datasets, files)}


def in_processes(function: Callable[..., Any], calls: list[tuple], runtime: RuntimeConfig) -> list[Any]:
    """`function(*call)` for every call, in order, spread over up to `runtime.workers` processes.

    Where the profile measures time, calls run one at a time, each in a process of its own:
    a call's wall time and peak memory are then its own, not inflated by another beside it or by
    memory an earlier one left to the allocator.
    """
    if runtime.measure_time:
        return [_pooled(function, [call], 1, runtime)[0] for call in calls]
    workers = min(runtime.workers, len(calls))
    if workers <= 1:
        return [function(*call) for call in calls]
    return _pooled(function, calls, workers, runtime)


def _call_in_worker(function: Callable[..., Any], call: tuple) -> tuple[Any, list[str]]:
    """A worker's result, and the package files the worker had loaded (the stage's code too)."""
    return function(*call), imported_code()


def _pooled(function: Callable[..., Any], calls: list[tuple], workers: int, runtime: RuntimeConfig) -> list[Any]:
    """The calls in a pool of `workers` new processes, pinned like the stage (threads, kernels), so results
    are the same bits as in one process. A single-threaded stage (DVC's, the warm server's) forks its
    imported modules; a multi-threaded one (a Prefect task) must not fork and spawns fresh interpreters."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if threading.active_count() == 1 else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=pin_runtime,
                             initargs=(runtime.threads, runtime.deterministic)) as pool:
        outcomes = list(pool.map(_call_in_worker, [function] * len(calls), calls))
    for _, code in outcomes:
        add_worker_code(code)
    return [result for result, _ in outcomes]


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove sub-folders no current variant uses, so the stage's output holds only live results."""
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child)


def run(params: Path, experiment: str, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    runs = experiment_runs(benchmark, profile, experiment)
    slugs = [variant_slug(run.name) for run in runs]
    if len(set(slugs)) != len(slugs):
        raise MoeclipError(f"experiment '{experiment}' has variant names that map to the same folder: {slugs}")
    # Own trainings first, so that no worker is left training alone at the end while the other idles.
    order = sorted(range(len(runs)), key=lambda i: not (runs[i].trained and
                                                        _reused_main_training(benchmark, profile, runs[i]) is None))
    calls = [(benchmark, profile, runs[i], profile.layout.variant(experiment, slugs[i]), experiment) for i in order]
    results = in_processes(_variant_metrics, calls, profile.runtime)
    by_name = {runs[i].name: result for i, result in zip(order, results)}
    _prune(profile.layout.variants(experiment), set(slugs))
    write_json(profile.layout.experiment_resources(experiment), {run.name: by_name[run.name][1] for run in runs})
    write_json(profile.layout.experiment_metrics(experiment), {run.name: by_name[run.name][0] for run in runs})
    return profile.layout.experiment_metrics(experiment)
