"""Where a profile's data, runs and reports live: every path the stages read and write, in one object.

The stage declarations (moeclip/bench/stages/) say with them what each stage reads and writes,
for dvc.yaml (rendered with `${profile}` in the paths) and the Prefect flow; the report finds the
stages' outputs through them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = "checkpoint.pt"


def checkpoint_in(folder: Path) -> Path:
    """The checkpoint of the training run kept in `folder`."""
    return Path(folder) / CHECKPOINT


@dataclass(frozen=True)
class RunLayout:
    """data/<profile>, runs/<profile> and reports/<profile>, and each file and folder below them."""

    data: Path
    runs: Path
    reports: Path

    # -- data/<profile> --------------------------------------------------------------------------
    def raw(self, dataset: str) -> Path:
        return self.data / "raw" / dataset

    def manifests(self) -> Path:
        return self.data / "manifests"

    def manifest(self, dataset: str) -> Path:
        return self.manifests() / f"{dataset}.parquet"

    # -- runs/<profile> --------------------------------------------------------------------------
    def trainings(self) -> Path:
        return self.runs / "train"

    def training(self, auxiliary: str) -> Path:
        """The folder of a main training (checkpoint, loss curve)."""
        return self.trainings() / auxiliary

    def checkpoint(self, auxiliary: str) -> Path:
        return checkpoint_in(self.training(auxiliary))

    def losses(self, auxiliary: str) -> Path:
        """A main training's loss curve, the CSV `dvc plots` draws."""
        return self.training(auxiliary) / "losses.csv"

    def evaluation(self, auxiliary: str, target: str) -> Path:
        """A main evaluation's tables (per class, summary)."""
        return self.runs / "evaluate" / auxiliary / target

    def metrics(self) -> Path:
        """Every stage's results, small files the report reads."""
        return self.runs / "metrics"

    def main_metrics(self) -> Path:
        """The main evaluations' metric files."""
        return self.metrics() / "evaluate"

    def evaluation_metrics(self, auxiliary: str, target: str) -> Path:
        """DVC metrics file of a main evaluation: {metric: value x100} of the stage metrics."""
        return self.main_metrics() / auxiliary / f"{target}.json"

    def experiment(self, experiment: str) -> Path:
        """An experiment's variants: trainings, kept evaluations."""
        return self.runs / "experiments" / experiment

    def variants(self, experiment: str) -> Path:
        return self.experiment(experiment) / "variants"

    def variant(self, experiment: str, slug: str) -> Path:
        return self.variants(experiment) / slug

    def experiment_metrics(self, experiment: str) -> Path:
        """An experiment's results: {variant: {dataset: {metric: value x100}}} (too wide for DVC metrics)."""
        return self.metrics() / "experiments" / f"{experiment}.json"

    def baseline(self, method: str) -> Path:
        """A Table 1 baseline's trainings (one per auxiliary dataset) and evaluation tables."""
        return self.runs / "baselines" / method

    def baseline_metrics(self, method: str) -> Path:
        """A baseline's results: {auxiliary: {target: {metric: value x100}}}."""
        return self.metrics() / "baselines" / f"{method}.json"

    def baseline_resources(self, method: str) -> Path:
        """A baseline's parameter counts (M)."""
        return self.resources() / "baselines" / f"{method}.json"

    def resources(self) -> Path:
        """What each experiment variant costs, beside the metrics."""
        return self.runs / "resources"

    def experiment_resources(self, experiment: str) -> Path:
        """Each variant's parameter counts (M), and wall time and peak memory where the profile measures time."""
        return self.resources() / "experiments" / f"{experiment}.json"

    def analysis(self) -> Path:
        return self.runs / "analysis"

    def stamps(self) -> Path:
        """Every stage call's stamp (the `stamps` stage writes them)."""
        return self.runs / "stamps"

    def stamp(self, label: str) -> Path:
        """One stage call's stamp ('train@visa'): its code and its settings, what DVC sees of them."""
        return self.stamps() / f"{label}.json"

    def usage(self, stage: str) -> Path:
        """The last run of a stage: wall time and peak memory (a log, not a DVC output)."""
        return self.runs / "usage" / f"{stage}.json"

    def before_after(self) -> Path:
        """`moeclip demo`'s untrained-vs-trained comparison."""
        return self.runs / "before-after"
