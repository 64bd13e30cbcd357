"""The benchmark plan of params.yaml: main trainings and evaluations, and every experiment's variants.

A variant lists only what it changes from its profile. Resolving it gives a `Run`: the full
model and training configuration, the auxiliary datasets, and a `training_key` that is equal
for two runs exactly when they need the same training. The pipeline uses the key to train
each distinct configuration once and to reuse the main trainings wherever an experiment's
variant is the default model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeclip.bench.params import ParamsError, Profile, profile_from_params, read_params, validation_problems
from moeclip.config import ModelConfig, TrainConfig

# Model fields that only act at test time: changing them needs no new training.
TEST_TIME_FIELDS = ("router_noise", "blur_industrial", "blur_medical")


class Variant(BaseModel):
    """One row of an experiment, as written in params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: dict[str, Any] = Field(default_factory=dict, description="ModelConfig overrides: MoECLIP's network and "
                                                                     "its training objective (lambda_etf, ...)")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig overrides (generic: epochs, lr, ...)")
    train_on: tuple[str, ...] | None = Field(None, description="auxiliary datasets; default: the main training's")
    trained: bool = Field(True, description="false = evaluate the model as built (e.g. vanilla CLIP)")
    paper_row: str | None = Field(None, description="the paper's row this variant reproduces; default: its name")
    x: dict[str, int | float] | None = Field(None, description="a figure's variants only: {swept parameter: value}, "
                                                               "its panel and its place on the x axis")

    @field_validator("x")
    @classmethod
    def _one_point(cls, x: dict[str, int | float] | None) -> dict[str, int | float] | None:
        if x is not None and len(x) != 1:
            raise ValueError(f"x names one parameter and its value, got {x}")
        return x


def check_points(render: str, variants: dict[str, Variant]) -> None:
    """A figure plots each variant at its `x`, which a table has no use for: say which variant breaks that."""
    for name, variant in variants.items():
        if (variant.x is None) == (render == "figure"):
            raise ValueError(f"variant '{name}' " + ("needs `x: {parameter: value}` (a figure's point)"
                                                    if variant.x is None else "of a table has an `x`"))


class Experiment(BaseModel):
    """One table or figure of the report: variants evaluated on the same datasets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    render: Literal["table", "figure"] = Field(description="a table of the variants beside the paper's numbers, "
                                                           "or a figure of each variant's metrics against its `x`")
    datasets: tuple[str, ...]
    cost: bool = Field(False, description="also measure parameters, latency, peak memory and FLOPs (Table 13)")
    variants: dict[str, Variant]

    @field_validator("variants")
    @classmethod
    def _not_empty(cls, variants: dict[str, Variant]) -> dict[str, Variant]:
        if not variants:
            raise ValueError("an experiment needs at least one variant")
        return variants

    @model_validator(mode="after")
    def _points_fit_render(self) -> "Experiment":
        check_points(self.render, self.variants)
        return self


class MainPlan(BaseModel):
    """The main trainings (auxiliary dataset -> zero-shot targets) and the default auxiliary dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auxiliary: str
    targets: dict[str, tuple[str, ...]]

    @model_validator(mode="after")
    def _auxiliary_is_trained(self) -> "MainPlan":
        if self.auxiliary not in self.targets:
            raise ValueError(f"main.auxiliary '{self.auxiliary}' has no entry in main.targets")
        return self


class MethodEntry(BaseModel):
    """One of Table 1's other methods that the benchmark runs (its settings are per profile)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(description="its name in the report")
    published: str = Field(description="the method whose published numbers stand beside ours: a Table 1 column "
                                        "of the paper, or an entry of moeclip/bench/reports/other_results.yaml")


class Benchmark(BaseModel):
    """The whole params file, validated: datasets, main plan, methods, profiles and experiments."""

    model_config = ConfigDict(extra="allow", frozen=True)

    profile: str
    datasets: tuple[str, ...]
    main: MainPlan
    methods: dict[str, MethodEntry]
    experiments: dict[str, Experiment]

    @property
    def table1_trainings(self) -> dict[str, tuple[str, ...]]:
        """Table 1's protocol: each auxiliary dataset with the targets evaluated on it (Table 12's own rows aside)."""
        return {auxiliary: targets for auxiliary, targets in self.main.targets.items() if targets}


@dataclass(frozen=True)
class Run:
    """A fully resolved model to evaluate: what it is (MoECLIP's or another method's config: its network and its
    losses), what it was trained on, and how it was optimised (the generic train settings)."""

    name: str
    paper_row: str
    model: BaseModel
    train: TrainConfig
    train_on: tuple[str, ...]
    trained: bool

    @property
    def test_time(self) -> dict[str, Any]:
        """The test-time model fields, applied when the checkpoint is loaded for evaluation."""
        return {name: value for name, value in self.model.model_dump(mode="json").items() if name in TEST_TIME_FIELDS}

    @property
    def training_key(self) -> str | None:
        """Digest of everything the training depends on (None for an untrained run)."""
        if not self.trained:
            return None
        model = {k: v for k, v in self.model.model_dump(mode="json").items() if k not in TEST_TIME_FIELDS}
        payload = {"model": model, "train": self.train.model_dump(mode="json"), "train_on": list(self.train_on)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def main_run(profile: Profile, *auxiliaries: str) -> Run:
    """The profile's default model trained on auxiliary dataset(s) (one: a Table 1 / Table 12 training), named
    by them ('visa', 'visa+mvtec')."""
    return Run("+".join(auxiliaries), "MoECLIP", profile.model, profile.train, auxiliaries, True)


def with_overrides(base: ModelConfig | TrainConfig, overrides: dict[str, Any], where: str) -> Any:
    """`base` with `overrides` applied, validated; errors name `where`."""
    try:
        return type(base).model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:
        raise ParamsError(f"{where} is invalid: {validation_problems(err)}") from None


def resolve_variant(profile: Profile, name: str, variant: Variant, default_train_on: tuple[str, ...],
                    where: str) -> Run:
    """Apply a variant's overrides to the profile's model and training settings."""
    overrides = dict(variant.model)
    if overrides.get("vanilla") and "output_layers" not in overrides:
        # Plain CLIP has no MoE layers; its heads read the layers the profile's model would use.
        overrides["output_layers"] = list(profile.model.feature_layers)
    model = with_overrides(profile.model, overrides, f"{where} model")
    train = with_overrides(profile.train, variant.train, f"{where} train")
    return Run(name, variant.paper_row or name, model, train, variant.train_on or default_train_on, variant.trained)


def selected_variants(benchmark: Benchmark, profile: Profile, experiment: str) -> dict[str, Variant]:
    """The variants `profile` runs for `experiment`: all, its `only` subset, or its own definitions."""
    if experiment not in benchmark.experiments:
        raise ParamsError(f"no experiment '{experiment}' in params (it has: {', '.join(benchmark.experiments)})")
    variants = benchmark.experiments[experiment].variants
    selection = profile.experiments.get(experiment)
    if selection is None:
        return variants
    if selection.variants is not None:
        try:
            own = {name: Variant.model_validate(spec) for name, spec in selection.variants.items()}
            check_points(benchmark.experiments[experiment].render, own)
        except (ValidationError, ValueError) as err:
            raise ParamsError(f"profile '{profile.name}' variants of '{experiment}' are invalid:\n{err}") from None
        return own
    unknown = [name for name in selection.only or () if name not in variants]
    if unknown:
        raise ParamsError(f"profile '{profile.name}' selects unknown variants of '{experiment}': {unknown}")
    return {name: variants[name] for name in selection.only or variants}


def experiment_runs(benchmark: Benchmark, profile: Profile, experiment: str) -> list[Run]:
    """Every resolved run of one experiment under one profile, in params order."""
    default_train_on = (benchmark.main.auxiliary,)
    return [resolve_variant(profile, name, variant, default_train_on, f"experiment '{experiment}' variant '{name}'")
            for name, variant in selected_variants(benchmark, profile, experiment).items()]


def experiment_datasets(benchmark: Benchmark, profile: Profile, experiment: str) -> set[str]:
    """The datasets an experiment reads: its test sets and the training sets of its trained variants."""
    return {*benchmark.experiments[experiment].datasets,
            *(dataset for run in experiment_runs(benchmark, profile, experiment) if run.trained
              for dataset in run.train_on)}


def load_plan(path: Path, profile_name: str | None = None) -> tuple[Benchmark, Profile]:
    """The benchmark and the chosen (default: active) profile of a params file, parsed once; errors name the file."""
    document = read_params(path)
    try:
        benchmark = Benchmark.model_validate(document)
    except ValidationError as err:
        raise ParamsError(f"params file '{path}' is invalid: {validation_problems(err)}") from None
    return benchmark, profile_from_params(document, Path(path), profile_name or benchmark.profile)
