"""Stage `baseline@<method>`: one Table 1 baseline trained (where it needs training) on each Table 1 auxiliary
dataset and evaluated zero-shot on that dataset's targets; its metrics and parameter counts.

Its units (moeclip/bench/units.py): one training (or, for a training-free method, one build) per
auxiliary dataset and one evaluation per (auxiliary, target), then the gathering of their results.
Trainings are kept while their configuration and training code stay the same (`ensure_trained`), so a
re-run after an edit elsewhere only evaluates again.
"""
from __future__ import annotations

from pathlib import Path

import moeclip.bench.tracking  # noqa: F401 - imported by the training and evaluation jobs: the stage's code
import moeclip.evaluation  # noqa: F401
import moeclip.figures  # noqa: F401
import moeclip.training  # noqa: F401
from moeclip.bench.baselines import method_runs
from moeclip.bench.experiments import Benchmark, Run
from moeclip.bench.layout import checkpoint_in
from moeclip.bench.params import Profile
from moeclip.bench.stages.common import computing_plan, summary_values, write_json
from moeclip.bench.stages.results import evaluation_key, keep_only, keep_result, kept_result, only_result
from moeclip.bench.stages.trained import ensure_trained, model_parameters
from moeclip.bench.units import Unit, evaluation_workload, run_units, training_workload
from moeclip.bench.workflows import evaluate_checkpoint, untrained_checkpoint


def train_baseline(profile: Profile, run: Run, folder: Path, method: str) -> Path:
    """Unit: the run's training (kept, resumed or trained), or the method as built when it is training-free."""
    if not run.trained:
        return untrained_checkpoint(run.model, run.train.seed, folder / "untrained.pt")
    return ensure_trained(profile, run, checkpoint_in(folder), f"train/{method}/{run.name}",
                          {"method": method, "auxiliary": run.name}).checkpoint


def evaluate_baseline(profile: Profile, run: Run, checkpoint: Path, target: str, folder: Path,
                      method: str) -> dict[str, float]:
    """Unit: {metric: value x100} of one auxiliary dataset's run on one target dataset, evaluated again only
    when its checkpoint, test set or evaluation code changed."""
    manifest = profile.layout.manifest(target)
    results, key = folder / "results" / run.name / target, evaluation_key(checkpoint, manifest)
    kept = kept_result(results, key)
    if kept is not None:
        return kept
    summary = evaluate_checkpoint(checkpoint, {target: manifest}, folder / "evaluations" / run.name / target,
                                  profile.tracking, profile.device, profile.runtime.eval_batch_size,
                                  run_name=f"evaluate/{method}/{run.name}/{target}",
                                  tags={"method": method, "auxiliary": run.name, "target": target,
                                        "profile": profile.name})
    return keep_result(results, key, summary_values(summary)[target])


def units(benchmark: Benchmark, profile: Profile, method: str) -> list[Unit]:
    """The method's trainings (or builds), then every (auxiliary, target) evaluation."""
    folder = profile.layout.baseline(method)
    trainings, evaluations = [], []
    for run in method_runs(benchmark, profile, method):
        source = folder / "trainings" / run.name
        checkpoint = checkpoint_in(source) if run.trained else source / "untrained.pt"
        name = f"{'train' if run.trained else 'build'}/{method}/{run.name}"
        trainings.append(Unit(name, run.trained, train_baseline, (profile, run, source, method),
                              workload=training_workload(run) if run.trained else None))
        evaluations += [Unit(f"evaluate/{method}/{run.name}/{target}", True, evaluate_baseline,
                             (profile, run, checkpoint, target, folder, method), (name,),
                             evaluation_workload(run, target)) for target in benchmark.table1_trainings[run.name]]
    return trainings + evaluations


def gather(benchmark: Benchmark, profile: Profile, method: str) -> Path:
    """The method's metrics ({auxiliary: {target: metrics}}) and parameter counts from its evaluations' files."""
    runs = method_runs(benchmark, profile, method)
    folder = profile.layout.baseline(method)
    keep_only(folder, {"trainings", "evaluations", "results"})
    for part in ("trainings", "evaluations", "results"):  # auxiliary datasets, then targets, the plan no longer has
        keep_only(folder / part, {run.name for run in runs})
    for run in runs:
        for part in ("evaluations", "results"):
            keep_only(folder / part / run.name, set(benchmark.table1_trainings[run.name]))
    metrics = {run.name: {target: only_result(folder / "results" / run.name / target)
                          for target in benchmark.table1_trainings[run.name]} for run in runs}
    write_json(profile.layout.baseline_resources(method), model_parameters(runs[0].model))
    write_json(profile.layout.baseline_metrics(method), metrics)
    return profile.layout.baseline_metrics(method)


def run(params: Path, method: str, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    run_units(units(benchmark, profile, method), profile.runtime)
    return gather(benchmark, profile, method)
