"""Stage `baseline@<method>`: one Table 1 baseline trained (where it needs training) on each Table 1 auxiliary
dataset and evaluated zero-shot on that dataset's targets; its metrics and parameter counts.

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
from moeclip.bench.experiments import Run
from moeclip.bench.layout import checkpoint_in
from moeclip.bench.params import Profile
from moeclip.bench.stages.common import computing_plan, summary_values, write_json
from moeclip.bench.stages.experiment import in_processes
from moeclip.bench.stages.trained import ensure_trained, model_parameters
from moeclip.bench.workflows import evaluate_checkpoint, untrained_checkpoint


def _checkpoint(profile: Profile, run: Run, folder: Path, method: str) -> Path:
    """The run's training (kept, resumed or trained), or the method as built when it is training-free."""
    if not run.trained:
        return untrained_checkpoint(run.model, run.train.seed, folder / "untrained.pt")
    return ensure_trained(profile, run, checkpoint_in(folder), f"train/{method}/{run.name}",
                          {"method": method, "auxiliary": run.name}).checkpoint


def _run_results(profile: Profile, run: Run, targets: tuple[str, ...], folder: Path,
                 method: str) -> dict[str, dict[str, float]]:
    """{target: {metric: value x100}} of one auxiliary dataset's run."""
    checkpoint = _checkpoint(profile, run, folder / "trainings" / run.name, method)
    summary = evaluate_checkpoint(checkpoint, {target: profile.layout.manifest(target) for target in targets},
                                  folder / "evaluations" / run.name, profile.tracking, profile.device,
                                  profile.runtime.eval_batch_size, run_name=f"evaluate/{method}/{run.name}",
                                  tags={"method": method, "auxiliary": run.name, "profile": profile.name})
    return summary_values(summary)


def run(params: Path, method: str, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    runs = method_runs(benchmark, profile, method)
    folder = profile.layout.baseline(method)
    calls = [(profile, run, benchmark.table1_trainings[run.name], folder, method) for run in runs]
    results = in_processes(_run_results, calls, profile.runtime)
    write_json(profile.layout.baseline_resources(method), model_parameters(runs[0].model))
    write_json(profile.layout.baseline_metrics(method), {run.name: result for run, result in zip(runs, results)})
    return profile.layout.baseline_metrics(method)
