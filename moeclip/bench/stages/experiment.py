"""Stage `experiment@<name>`: train (or reuse) and evaluate every variant of one experiment; its metrics file.

Its units (moeclip/bench/units.py): one training per distinct training of the experiment (variants that
equal each other train once; a variant equal to a main training reuses it), one evaluation per
(variant, dataset), one cost measurement per variant where the experiment measures cost, and the
gathering of their results. Each unit is idempotent: it re-trains only what a changed configuration or
training code affects and re-evaluates only what a changed checkpoint, setting or evaluation code
affects, so a re-run after an interruption or an edit redoes just the missing work.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import moeclip.bench.tracking  # noqa: F401 - imported by the training and evaluation jobs: the stage's code
import moeclip.evaluation  # noqa: F401
import moeclip.figures  # noqa: F401
import moeclip.training  # noqa: F401
from moeclip.bench.experiments import Benchmark, Run, experiment_runs, main_run
from moeclip.bench.layout import checkpoint_in
from moeclip.bench.params import Profile
from moeclip.bench.stages.common import computing_plan, summary_values, write_json
from moeclip.bench.stages.results import evaluation_key, keep_only, keep_result, kept_result, only_result
from moeclip.bench.stages.trained import ensure_trained, model_parameters
from moeclip.bench.units import Unit, evaluation_workload, run_units, training_workload
from moeclip.bench.workflows import evaluate_checkpoint, untrained_checkpoint
from moeclip.cost import measure_cost
from moeclip.errors import MoeclipError
from moeclip.resources import measured

# What a variant's folder holds: its training (or untrained build), kept results and evaluation tables per
# dataset, its cost, and its units' usage where the profile measures time.
VARIANT_PARTS = {"trainings", "untrained.pt", "results", "tables", "cost", "usage"}


def variant_slug(name: str) -> str:
    """A folder name for a variant ('w/o FOFS & ETF Loss' -> 'w-o-fofs-etf-loss')."""
    return re.sub(r"[^a-z0-9.=]+", "-", name.lower()).strip("-") or "variant"


def _reused_main_training(benchmark: Benchmark, profile: Profile, run: Run) -> str | None:
    """The auxiliary dataset of the main training that is the same training as `run`, if there is one."""
    return next((auxiliary for auxiliary in benchmark.main.targets
                 if main_run(profile, auxiliary).training_key == run.training_key), None)


def _reuses_main_evaluation(benchmark: Benchmark, profile: Profile, run: Run, experiment: str) -> str | None:
    """The main training whose results are the variant's, when it is a main training evaluated as they were
    (same test-time settings, datasets among that training's targets, no cost to measure).

    The default row of most experiments is exactly that; evaluating it again would give the same
    numbers (the evaluation is seeded) at the cost of a full pass over the test sets.
    """
    spec = benchmark.experiments[experiment]
    auxiliary = _reused_main_training(benchmark, profile, run)
    if spec.cost or auxiliary is None or run.test_time != main_run(profile, auxiliary).test_time or \
            not set(spec.datasets) <= set(benchmark.main.targets[auxiliary]):
        return None
    return auxiliary


def train_variant(profile: Profile, run: Run, folder: Path, experiment: str) -> Path:
    """Unit: the variant's own training (kept, resumed or trained) in `folder`, earlier configurations' removed."""
    with _usage(profile, folder, "train"):
        keep_only(folder / "trainings", {str(run.training_key)})
        return ensure_trained(profile, run, _training_checkpoint(folder, run), f"train/{experiment}/{run.name}",
                              {"experiment": experiment, "variant": run.name}).checkpoint


def build_variant(profile: Profile, run: Run, folder: Path) -> Path:
    """Unit: an untrained variant (vanilla CLIP) built as its checkpoint."""
    keep_only(folder / "trainings", set())
    return untrained_checkpoint(run.model, profile.train.seed, folder / "untrained.pt")


def _training_checkpoint(folder: Path, run: Run) -> Path:
    return checkpoint_in(folder / "trainings" / str(run.training_key))


def evaluate_variant(profile: Profile, run: Run, checkpoint: Path, dataset: str, folder: Path,
                     experiment: str) -> dict[str, float]:
    """Unit: a variant's metrics (x100) on one dataset, evaluated again only when its inputs changed."""
    manifest = profile.layout.manifest(dataset)
    results, key = folder / "results" / dataset, evaluation_key(checkpoint, manifest, test_time=run.test_time)
    kept = kept_result(results, key)
    if kept is not None:
        return kept
    with _usage(profile, folder, f"evaluate-{dataset}"):
        summary = evaluate_checkpoint(checkpoint, {dataset: manifest}, folder / "tables" / dataset, profile.tracking,
                                      profile.device, profile.runtime.eval_batch_size,
                                      run_name=f"evaluate/{experiment}/{run.name}/{dataset}", test_time=run.test_time,
                                      tags={"experiment": experiment, "variant": run.name, "dataset": dataset,
                                            "profile": profile.name})
    return keep_result(results, key, summary_values(summary)[dataset])


def variant_cost(profile: Profile, run: Run, checkpoint: Path, folder: Path) -> dict[str, Any]:
    """Unit: a variant's inference cost (parameters, FLOPs, and time where the profile measures it)."""
    key = evaluation_key(checkpoint, None, test_time=run.test_time, timing=profile.runtime.measure_time,
                         repeats=profile.runtime.timed_forwards)
    kept = kept_result(folder / "cost", key)
    if kept is not None:
        return kept
    with _usage(profile, folder, "cost"):
        cost = measure_cost(checkpoint, run.test_time, profile.device, profile.runtime.measure_time,
                            profile.runtime.timed_forwards)
    return keep_result(folder / "cost", key, cost)


@contextmanager
def _usage(profile: Profile, folder: Path, part: str) -> Iterator[None]:
    """Where the profile measures time: the enclosed work's wall time and peak memory as
    `<variant>/usage/<part>.json`, which the gathering step adds up per variant."""
    if not profile.runtime.measure_time:
        yield
        return
    with measured() as usage:
        yield
    write_json(folder / "usage" / f"{part}.json", usage[0].as_dict())


def units(benchmark: Benchmark, profile: Profile, experiment: str) -> list[Unit]:
    """Every unit of one experiment, in params order: trainings and builds, then evaluations and costs."""
    runs = experiment_runs(benchmark, profile, experiment)
    spec = benchmark.experiments[experiment]
    trainings: dict[str, tuple[str, Path]] = {}  # training key -> (unit name, checkpoint)
    models, evaluations = [], []
    for run in runs:
        folder = profile.layout.variant(experiment, variant_slug(run.name))
        reused = _reused_main_training(benchmark, profile, run) if run.trained else None
        if not run.trained:
            source = (f"build/{experiment}/{run.name}", folder / "untrained.pt")
            models.append(Unit(source[0], False, build_variant, (profile, run, folder)))
        elif reused:
            source = ("", profile.layout.checkpoint(reused))
        elif run.training_key in trainings:
            source = trainings[str(run.training_key)]
        else:
            source = trainings[str(run.training_key)] = (f"train/{experiment}/{run.name}",
                                                         _training_checkpoint(folder, run))
            models.append(Unit(source[0], True, train_variant, (profile, run, folder, experiment),
                               workload=training_workload(run)))
        if _reuses_main_evaluation(benchmark, profile, run, experiment):
            continue
        after = (source[0],) if source[0] else ()
        evaluations += [Unit(f"evaluate/{experiment}/{run.name}/{dataset}", True, evaluate_variant,
                             (profile, run, source[1], dataset, folder, experiment), after,
                             evaluation_workload(run, dataset)) for dataset in spec.datasets]
        if spec.cost:
            evaluations.append(Unit(f"cost/{experiment}/{run.name}", True, variant_cost,
                                    (profile, run, source[1], folder), after))
    return models + evaluations


def gather(benchmark: Benchmark, profile: Profile, experiment: str) -> Path:
    """The experiment's metrics and resources files from its units' results (and the main results it reuses)."""
    runs = experiment_runs(benchmark, profile, experiment)
    spec = benchmark.experiments[experiment]
    trainers = {unit.args[2] for unit in units(benchmark, profile, experiment)
                if unit.work is train_variant}
    metrics, resources = {}, {}
    for run in runs:
        folder = profile.layout.variant(experiment, variant_slug(run.name))
        if folder not in trainers:  # a training it no longer owns (it reuses another, or is untrained)
            shutil.rmtree(folder / "trainings", ignore_errors=True)
        auxiliary = _reuses_main_evaluation(benchmark, profile, run, experiment)
        if auxiliary:
            shutil.rmtree(folder, ignore_errors=True)  # results of an earlier, own evaluation
            metrics[run.name] = {dataset: _read(profile.layout.evaluation_metrics(auxiliary, dataset))
                                 for dataset in spec.datasets}
        else:
            keep_only(folder, VARIANT_PARTS)
            for part in ("results", "tables"):  # datasets the experiment no longer has
                keep_only(folder / part, set(spec.datasets))
            metrics[run.name] = {dataset: only_result(folder / "results" / dataset) for dataset in spec.datasets}
            if spec.cost:
                metrics[run.name]["cost"] = only_result(folder / "cost")
        resources[run.name] = model_parameters(run.model)
        if profile.runtime.measure_time:
            resources[run.name] |= _summed_usage(folder / "usage")
    keep_only(profile.layout.variants(experiment), {variant_slug(run.name) for run in runs})
    write_json(profile.layout.experiment_resources(experiment), resources)
    write_json(profile.layout.experiment_metrics(experiment), metrics)
    return profile.layout.experiment_metrics(experiment)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise MoeclipError(f"'{path}' is missing: run the stage that writes it first (`dvc repro`)")
    return json.loads(path.read_text())


def _summed_usage(folder: Path) -> dict[str, float | None]:
    """A variant's units' wall time added up, and their largest peaks (None where nothing ran here)."""
    parts = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    if not parts:
        return {"seconds": None, "peak_rss_gib": None, "cuda_peak_gib": None}
    cuda = [part["cuda_peak_gib"] for part in parts if part["cuda_peak_gib"] is not None]
    return {"seconds": round(sum(part["seconds"] for part in parts), 3),
            "peak_rss_gib": max(part["peak_rss_gib"] for part in parts), "cuda_peak_gib": max(cuda) if cuda else None}


def run(params: Path, experiment: str, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    slugs = [variant_slug(run.name) for run in experiment_runs(benchmark, profile, experiment)]
    if len(set(slugs)) != len(slugs):
        raise MoeclipError(f"experiment '{experiment}' has variant names that map to the same folder: {slugs}")
    missing = [str(path) for path in _reused_main_results(benchmark, profile, experiment) if not path.is_file()]
    if missing:  # said before any training starts
        raise MoeclipError(f"experiment '{experiment}' reuses main results that are missing: {', '.join(missing)} "
                           f"(run `dvc repro` for the evaluate stages first)")
    run_units(units(benchmark, profile, experiment), profile.runtime)
    return gather(benchmark, profile, experiment)


def _reused_main_results(benchmark: Benchmark, profile: Profile, experiment: str) -> list[Path]:
    """The main evaluations' metric files the experiment's default rows take as theirs."""
    return [profile.layout.evaluation_metrics(auxiliary, dataset)
            for run in experiment_runs(benchmark, profile, experiment)
            if (auxiliary := _reuses_main_evaluation(benchmark, profile, run, experiment))
            for dataset in benchmark.experiments[experiment].datasets]
