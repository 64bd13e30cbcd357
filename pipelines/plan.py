"""Which stages one flow run executes: the params.yaml plan, cut down to a subset of datasets and experiments.

Kept apart from the flow so the selection rules are testable without a Prefect server. A stage
is kept only when every dataset it reads is in the subset, so a partial run never fails for
lack of a manifest it was told to leave out.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeclip.bench.experiments import Benchmark, experiment_datasets
from moeclip.bench.params import Profile
from moeclip.bench.stages import STAGES
from moeclip.bench.stages import analysis as analysis_stage


@dataclass(frozen=True)
class StagePlan:
    """The stage calls of one run, in params.yaml order."""

    datasets: tuple[str, ...]                    # fetch and prepare
    trainings: tuple[str, ...]                   # main trainings, by auxiliary dataset
    evaluations: tuple[tuple[str, str], ...]     # (auxiliary, target)
    methods: tuple[str, ...]                     # Table 1 baselines
    experiments: tuple[str, ...]
    analysis: bool
    complete: bool                               # nothing left out, so the report can be rendered

    def calls(self, report: bool) -> list[tuple[str, dict[str, str]]]:
        """(stage name, arguments) of every stage call, in the order of the stage declarations."""
        values = {"datasets": [(d,) for d in self.datasets], "trainings": [(a,) for a in self.trainings],
                  "evaluations": list(self.evaluations), "methods": [(m,) for m in self.methods],
                  "experiments": [(e,) for e in self.experiments]}
        once = {"stamps": True, "analysis": self.analysis, "report": report and self.complete}
        return [(stage.name, dict(zip(stage.arguments, call))) for stage in STAGES
                for call in (values[stage.fan_out] if stage.fan_out else [()] if once[stage.name] else [])]


def analysis_datasets(benchmark: Benchmark, profile: Profile) -> set[str]:
    """The datasets the analysis stage needs: those it reads and the main training's."""
    return {benchmark.main.auxiliary, *analysis_stage.datasets(benchmark, profile)}


def _unknown(kind: str, asked: Iterable[str], known: Sequence[str]) -> None:
    missing = [name for name in asked if name not in known]
    if missing:
        raise ValueError(f"unknown {kind} {missing}; params.yaml has: {', '.join(known)}")


def plan_stages(benchmark: Benchmark, profile: Profile, datasets: Sequence[str] | None = None,
                experiments: Sequence[str] | None = None) -> StagePlan:
    """The stages for `datasets` (default: all) and `experiments` (default: all that the datasets allow); the
    baselines run when every dataset of Table 1's protocol is chosen.

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
    table1 = {*benchmark.table1_trainings, *(t for targets in benchmark.table1_trainings.values() for t in targets)}
    methods = tuple(benchmark.methods) if table1 <= set(chosen) else ()
    analysis = analysis_datasets(benchmark, profile) <= set(chosen)
    complete = chosen == benchmark.datasets and selected == tuple(benchmark.experiments) and analysis
    return StagePlan(chosen, trainings, evaluations, methods, selected, analysis, complete)
