"""Which stages one flow run executes: the params.yaml plan, cut down to a subset of datasets and experiments.

Kept apart from the flow so the selection rules are testable without a Prefect server. A stage
is kept only when every dataset it reads is in the subset, so a partial run never fails for
lack of a manifest it was told to leave out.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moeclip.bench.experiments import Benchmark, experiment_runs
from moeclip.bench.params import Profile


@dataclass(frozen=True)
class StagePlan:
    """The stage calls of one run, in params.yaml order."""

    datasets: tuple[str, ...]                    # fetch and prepare
    trainings: tuple[str, ...]                   # main trainings, by auxiliary dataset
    evaluations: tuple[tuple[str, str], ...]     # (auxiliary, target)
    experiments: tuple[str, ...]
    analysis: bool
    complete: bool                               # nothing left out, so the report can be rendered


def experiment_datasets(benchmark: Benchmark, profile: Profile, experiment: str) -> set[str]:
    """The datasets an experiment reads: its test sets and the training sets of its trained variants."""
    runs = experiment_runs(benchmark, profile, experiment)
    return {*benchmark.experiments[experiment].datasets,
            *(dataset for run in runs if run.trained for dataset in run.train_on)}


def analysis_datasets(benchmark: Benchmark, profile: Profile) -> set[str]:
    """The datasets the analysis stage reads (moeclip.bench.pipeline.analyse)."""
    auxiliary = benchmark.main.auxiliary
    return {auxiliary, *benchmark.main.targets[auxiliary],
            profile.analysis.similarity_dataset, profile.analysis.statistics_dataset}


def _unknown(kind: str, asked: Iterable[str], known: Sequence[str]) -> None:
    missing = [name for name in asked if name not in known]
    if missing:
        raise ValueError(f"unknown {kind} {missing}; params.yaml has: {', '.join(known)}")


def plan_stages(benchmark: Benchmark, profile: Profile, datasets: Sequence[str] | None = None,
                experiments: Sequence[str] | None = None) -> StagePlan:
    """The stages for `datasets` (default: all) and `experiments` (default: all that the datasets allow).

    Experiments named explicitly must be runnable with the chosen datasets; otherwise this raises
    rather than silently dropping them.
    """
    _unknown("datasets", datasets or (), benchmark.datasets)
    chosen = tuple(d for d in benchmark.datasets if datasets is None or d in datasets)
    trainings = tuple(a for a in benchmark.main.targets if a in chosen)
    evaluations = tuple((a, t) for a in trainings for t in benchmark.main.targets[a] if t in chosen)
    if experiments is None:
        selected = tuple(e for e in benchmark.experiments
                         if experiment_datasets(benchmark, profile, e) <= set(chosen))
    else:
        _unknown("experiments", experiments, tuple(benchmark.experiments))
        selected = tuple(e for e in benchmark.experiments if e in experiments)
        for experiment in selected:
            lacking = experiment_datasets(benchmark, profile, experiment) - set(chosen)
            if lacking:
                raise ValueError(f"experiment '{experiment}' needs datasets left out of this run: {sorted(lacking)}")
    analysis = analysis_datasets(benchmark, profile) <= set(chosen)
    complete = chosen == benchmark.datasets and selected == tuple(benchmark.experiments) and analysis
    return StagePlan(chosen, trainings, evaluations, selected, analysis, complete)
