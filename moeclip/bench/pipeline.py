"""The benchmark's pipeline stages, one function each, for dvc.yaml (`moeclip stage ...`) and the Prefect flow.

Every stage reads the plan from params.yaml, does its work through `moeclip.bench.workflows`, and
writes its outputs where dvc.yaml declares them (all under the profile's data, runs and
reports folders). Stages are idempotent: an experiment re-trains only variants whose
configuration changed and re-evaluates only what a changed checkpoint, setting or evaluation
code affects, so a re-run after an interruption or a params edit redoes just the missing work.
(A change to training code alone does not retrain a finished training: see the README.)
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moeclip.atomic import atomic_path, write_text_atomically
from moeclip.config import ModelConfig
from moeclip.data.archive import file_sha256
from moeclip.errors import MoeclipError
from moeclip.bench.experiments import Benchmark, Run, experiment_runs, load_plan, main_run
from moeclip.bench.layout import checkpoint_in
from moeclip.bench.params import Profile, RuntimeConfig
from moeclip.resources import Usage, measured

PACKAGE = Path(__file__).resolve().parents[1]  # the moeclip package
# The code an experiment variant's evaluation results depend on (all of them deps of the
# experiment stages in dvc.yaml): a change to any of them re-evaluates kept variants.
EVALUATION_CODE = ("model", "evaluation.py", "metrics", "cost.py", "checkpoint.py", "data/dataset.py",
                   "data/transforms.py")
# The metrics the stages' metric files keep: the paper's four and AUPRO, five columns that
# `dvc metrics show` prints within 120 characters. Every evaluation's summary.json has them all.
STAGE_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")


def record_usage(params: Path, profile_name: str | None, stage: str, usage: Usage) -> None:
    _, profile = load_plan(params, profile_name)
    _write_json(profile.layout.usage(stage), usage.as_dict())


def _write_json(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=2, sort_keys=False, allow_nan=True) + "\n")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(root: Path, paths: tuple[str, ...]) -> str:
    """A digest of the Python files at `paths` under `root` (folders recursively): names and contents."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted((root / path).rglob("*.py")) if (root / path).is_dir() else [root / path]
        for file in files:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _evaluation_code() -> str:
    return code_digest(PACKAGE, EVALUATION_CODE)


def _computing_plan(params: Path, profile_name: str | None) -> tuple[Benchmark, Profile]:
    """The plan of a stage that computes with torch, after pinning the profile's runtime (threads, kernels)."""
    from moeclip.runtime import pin_runtime

    benchmark, profile = load_plan(params, profile_name)
    pin_runtime(profile.runtime.threads, profile.runtime.deterministic)
    return benchmark, profile


# -- data ------------------------------------------------------------------------------------
def fetch(params: Path, dataset: str, profile_name: str | None = None) -> Path:
    """Stage `fetch@<dataset>`: the raw dataset folder (downloaded, found in place, or synthesised)."""
    from moeclip.bench.workflows import fetch_profile_dataset

    _, profile = load_plan(params, profile_name)
    return fetch_profile_dataset(profile, dataset)


def prepare(params: Path, dataset: str, profile_name: str | None = None) -> Path:
    """Stage `prepare@<dataset>`: the validated manifest."""
    from moeclip.bench.workflows import prepare_profile_dataset

    _, profile = load_plan(params, profile_name)
    return prepare_profile_dataset(profile, dataset)


# -- trainings ---------------------------------------------------------------------------------
def _checkpoint_state(checkpoint: Path, run: Run) -> str:
    """'complete', 'partial' (resumable), 'stale' (another configuration or format) or 'missing'."""
    from moeclip.checkpoint import OutdatedCheckpointError, read_checkpoint

    if not checkpoint.is_file():
        return "missing"
    try:
        payload = read_checkpoint(checkpoint)
    except OutdatedCheckpointError:
        return "stale"
    if payload.get("model_config") != run.model.model_dump(mode="json") or \
            payload.get("train_config") != run.train.model_dump(mode="json"):
        return "stale"
    return "complete" if payload.get("progress", {}).get("complete") else "partial"


def ensure_trained(profile: Profile, run: Run, checkpoint: Path, run_name: str,
                   tags: Mapping[str, str] | None = None) -> Path:
    """The run's `checkpoint`: kept if complete, resumed if interrupted, retrained if stale."""
    from moeclip.bench.workflows import train_model

    state = _checkpoint_state(checkpoint, run)
    if state == "complete":
        return checkpoint
    if state == "stale":
        checkpoint.unlink()
    return train_model(profile, run.model, run.train, run.train_on, checkpoint, run_name, tags)


def train(params: Path, auxiliary: str, profile_name: str | None = None) -> Path:
    """Stage `train@<auxiliary>`: the profile's model trained on one auxiliary dataset."""
    import pandas as pd

    from moeclip.checkpoint import read_checkpoint

    benchmark, profile = _computing_plan(params, profile_name)
    if auxiliary not in benchmark.main.targets:
        raise MoeclipError(f"'{auxiliary}' is not a main training in '{params}' "
                           f"(main.targets: {', '.join(benchmark.main.targets)})")
    checkpoint = ensure_trained(profile, main_run(profile, auxiliary), profile.layout.checkpoint(auxiliary),
                                f"train/{auxiliary}", {"auxiliary": auxiliary})
    with atomic_path(profile.layout.losses(auxiliary)) as temporary:  # the loss curves `dvc plots` draws
        pd.DataFrame(read_checkpoint(checkpoint)["history"]).to_csv(temporary, index=False)
    return checkpoint


def _main_checkpoint(profile: Profile, auxiliary: str) -> Path:
    checkpoint = profile.layout.checkpoint(auxiliary)
    if _checkpoint_state(checkpoint, main_run(profile, auxiliary)) != "complete":
        raise MoeclipError(f"'{checkpoint}' is missing or unfinished: run `dvc repro train@{auxiliary}` "
                           f"(or `moeclip stage train {auxiliary}`) first")
    return checkpoint


# -- evaluations -------------------------------------------------------------------------------
def evaluate(params: Path, auxiliary: str, target: str, profile_name: str | None = None) -> Path:
    """Stage `evaluate-<auxiliary>@<target>`: zero-shot results of a main training on one target dataset."""
    from moeclip.bench.workflows import evaluate_checkpoint

    _, profile = _computing_plan(params, profile_name)
    summary = evaluate_checkpoint(_main_checkpoint(profile, auxiliary), {target: profile.layout.manifest(target)},
                                  profile.layout.evaluation(auxiliary, target), profile.tracking, profile.device,
                                  profile.runtime.eval_batch_size,
                                  run_name=f"evaluate/{auxiliary}/{target}",
                                  tags={"auxiliary": auxiliary, "target": target, "profile": profile.name})
    metrics = profile.layout.evaluation_metrics(auxiliary, target)
    _write_json(metrics, _summary_values(summary)[target])  # flat: one row of `dvc metrics show`
    return metrics


def _summary_values(summary) -> dict[str, dict[str, float]]:
    """An evaluation summary frame as {dataset: {metric: value}} of the STAGE_METRICS a dataset has."""
    return {dataset: {metric: float(value) for metric, value in row.dropna().items() if metric in STAGE_METRICS}
            for dataset, row in summary.iterrows()}


# -- experiments -------------------------------------------------------------------------------
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
    from moeclip.bench.workflows import untrained_checkpoint

    trainings = folder / "trainings"
    reused = _reused_main_training(benchmark, profile, run)
    _prune(trainings, {str(run.training_key)} if run.trained and not reused else set())
    if not run.trained:
        return untrained_checkpoint(run.model, profile.train.seed, folder / "untrained.pt")
    if reused:
        return _main_checkpoint(profile, reused)
    return ensure_trained(profile, run, checkpoint_in(trainings / str(run.training_key)),
                          f"train/{experiment}/{run.name}", {"experiment": experiment, "variant": run.name})


def _evaluate_variant(profile: Profile, run: Run, checkpoint: Path, datasets: tuple[str, ...], folder: Path,
                      experiment: str, cost: bool) -> dict[str, dict[str, float]]:
    """A variant's per-dataset metrics (x100), re-evaluated only when its inputs changed."""
    from moeclip.bench.workflows import evaluate_checkpoint

    manifests = {dataset: profile.layout.manifest(dataset) for dataset in datasets}
    key = _digest({"checkpoint": file_sha256(checkpoint), "test_time": run.test_time, "code": _evaluation_code(),
                   "cost": cost and {"timing": profile.runtime.measure_time, "repeats": profile.runtime.timed_forwards},
                   "manifests": {name: file_sha256(path) for name, path in manifests.items()}})
    results_file = folder / f"{key}.json"
    if results_file.is_file():
        return json.loads(results_file.read_text())
    summary = evaluate_checkpoint(checkpoint, manifests, folder / "tables", profile.tracking, profile.device,
                                  profile.runtime.eval_batch_size,
                                  run_name=f"evaluate/{experiment}/{run.name}", test_time=run.test_time,
                                  tags={"experiment": experiment, "variant": run.name, "profile": profile.name})
    results = _summary_values(summary)
    if cost:
        from moeclip.cost import measure_cost

        results["cost"] = measure_cost(checkpoint, run.test_time, profile.device, profile.runtime.measure_time,
                                       profile.runtime.timed_forwards)
    for old in folder.glob("*.json"):
        old.unlink()
    _write_json(results_file, results)
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


def model_parameters(model: ModelConfig) -> dict[str, float]:
    """Total and trainable parameters (M) of a model (counts do not depend on its weights)."""
    from moeclip.model import count_parameters

    counts = count_parameters(model)
    return {"params_m": counts["total"] / 1e6, "trainable_m": counts["trainable"] / 1e6}


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


def _pooled(function: Callable[..., Any], calls: list[tuple], workers: int, runtime: RuntimeConfig) -> list[Any]:
    """The calls in a pool of `workers` new processes, pinned like the stage (threads, kernels), so results
    are the same bits as in one process. A single-threaded stage (DVC's, the warm server's) forks its
    imported modules; a multi-threaded one (a Prefect task) must not fork and spawns fresh interpreters."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    from moeclip.runtime import pin_runtime

    method = "fork" if threading.active_count() == 1 else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=pin_runtime,
                             initargs=(runtime.threads, runtime.deterministic)) as pool:
        return list(pool.map(function, *zip(*calls)))


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove sub-folders no current variant uses, so the stage's output holds only live results."""
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child)


def run_experiment(params: Path, experiment: str, profile_name: str | None = None) -> Path:
    """Stage `experiment@<name>`: train (or reuse) and evaluate every variant; writes its metrics file."""
    benchmark, profile = _computing_plan(params, profile_name)
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
    _write_json(profile.layout.experiment_resources(experiment), {run.name: by_name[run.name][1] for run in runs})
    _write_json(profile.layout.experiment_metrics(experiment), {run.name: by_name[run.name][0] for run in runs})
    return profile.layout.experiment_metrics(experiment)


# -- analyses (Figs. 5/10 and 9, Table 14) --------------------------------------------------
def analyse(params: Path, profile_name: str | None = None) -> Path:
    """Stage `analysis`: expert utilisation per dataset, inter-expert similarity, routed-patch statistics."""
    import pandas as pd

    from moeclip.analysis import expert_utilisation, inter_expert_similarity, routed_patch_statistics
    from moeclip.checkpoint import load_model
    from moeclip.runtime import resolve_device

    benchmark, profile = _computing_plan(params, profile_name)
    auxiliary = benchmark.main.auxiliary
    model, _ = load_model(_main_checkpoint(profile, auxiliary), resolve_device(profile.device))
    layer = profile.analysis.layer
    if str(layer) not in model.moe:
        raise MoeclipError(f"analysis layer {layer} of profile '{profile.name}' carries no MoE "
                           f"(MoE layers: {sorted(int(k) for k in model.moe)})")
    out = profile.layout.analysis()
    utilisation = pd.concat(
        [expert_utilisation(model, _loader(profile, model, dataset), [layer]).assign(dataset=dataset)
         for dataset in benchmark.main.targets[auxiliary]], ignore_index=True)
    similarity = inter_expert_similarity(model, _loader(profile, model, profile.analysis.similarity_dataset), layer)
    statistics = routed_patch_statistics(model, _loader(profile, model, profile.analysis.statistics_dataset), layer)
    with atomic_path(out / "utilisation.csv") as temporary:
        utilisation.to_csv(temporary, index=False)
    with atomic_path(out / "routed_statistics.csv") as temporary:
        statistics.to_csv(temporary, index=False)
    matrix = [[None if v != v else float(v) for v in row] for row in similarity]  # NaN (unused expert) -> null
    _write_json(out / "similarity.json",
                {"layer": layer, "dataset": profile.analysis.similarity_dataset, "matrix": matrix})
    return out


def _loader(profile: Profile, model, dataset: str):
    from torch.utils.data import DataLoader

    from moeclip.bench.workflows import read_manifests

    frame = read_manifests({dataset: profile.layout.manifest(dataset)})
    return DataLoader(model.inputs(frame), batch_size=profile.runtime.eval_batch_size)


# -- report ----------------------------------------------------------------------------------
def report(params: Path, profile_name: str | None = None) -> Path:
    """Stage `report`: every table and figure, rendered from the stages' metric files."""
    from moeclip.bench.reports.render import render_reports

    benchmark, profile = load_plan(params, profile_name)
    return render_reports(benchmark, profile)
