"""params.yaml: named profiles, each a validated model + train + data + tracking configuration.

Every hyperparameter lives in params.yaml; code only reads it through `load_profile` and
`read_params` (the experiments section is modelled in moeclip/bench/experiments.py).
A profile states every model and train field (`ModelConfig` and `TrainConfig` have no defaults, so each
value lives once, in params.yaml); the data, tracking and runtime sections fill what they leave out with
the defaults their fields name (as do the analysis section and the runs, reports and device paths).
Each method owns its settings: MoECLIP's network and losses are the profile's `model`, a baseline's are its
`methods.<name>.model`; a `train` section holds only the generic optimisation settings (`TrainConfig`),
so a stage that runs one method depends on that method's settings alone (moeclip/bench/stages/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeclip.bench.layout import RunLayout
from moeclip.config import ModelConfig, TrainConfig
from moeclip.errors import MoeclipError


class ParamsError(MoeclipError):
    """params.yaml is missing, malformed, or has no such profile."""


class DataConfig(BaseModel):
    """Where a profile's datasets live and whether they are the synthetic demo sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path | None = Field(None, description="raw datasets in <root>/raw/<name>, manifests in "
                                                "<root>/manifests; default data/<profile> (what dvc.yaml uses)")
    synthetic: bool = Field(False, description="generate the offline demo datasets instead of fetching")
    seed: int = Field(0, ge=0, description="seed of the synthetic datasets")
    image_size: int = Field(64, ge=16, description="side at which synthetic images are drawn")
    per_class: int = Field(6, ge=1, description="synthetic normal and anomalous test images per class")
    classes: int | None = Field(None, ge=1, description="keep the first classes of each synthetic set "
                                                       "(null: all); a smoke run's small trees")
    real_sizes: bool = Field(False, description="stretch synthetic images to each real set's typical size "
                                                "(160-1600 px, square or not) and keep its file formats")


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "zsad-bench"
    figures_per_dataset: int = Field(3, ge=0, description="example anomaly maps each evaluation logs per dataset "
                                                          "(rendering one costs about 0.3 s on a CPU)")


class AnalysisConfig(BaseModel):
    """Settings of the expert analyses (Figs. 5/9/10, Table 14)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(18, ge=1, description="MoE layer analysed (the paper's layer 18 of 24)")
    statistics_dataset: str = Field("brainmri", description="dataset of Table 14's routed-patch statistics")
    similarity_dataset: str = Field("mvtec", description="dataset of the inter-expert similarity figure")


class RuntimeConfig(BaseModel):
    """How a profile's stages compute, pinned so that its numbers do not depend on the machine (see moeclip.runtime)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int | None = Field(None, ge=1, description="torch CPU threads of every stage; null = torch's "
                                                        "default (one per core), which varies between machines")
    deterministic: bool = Field(True, description="torch's deterministic algorithms (a warning where an op has "
                                                  "none) and a fixed cuBLAS workspace")
    measure_time: bool = Field(True, description="time inference and measure peak memory for Table 13; they "
                                                 "vary between machines, so off where outputs are committed")
    timed_forwards: int = Field(10, ge=1, description="timed passes of Table 13's latency (median), after up to "
                                                      "3 warm-up passes")
    workers: int = Field(1, ge=1, description="an experiment's variants computed at once, each in its own process "
                                            "with `threads` threads (results do not change); 1 on one GPU")
    eval_batch_size: int = Field(8, ge=1, description="test images per forward pass in evaluations and analyses")


class ExperimentSelection(BaseModel):
    """How a profile runs one experiment: all its variants, a subset (`only`), or its own `variants`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    only: tuple[str, ...] | None = None
    variants: dict[str, dict[str, Any]] | None = None


class MethodSettings(BaseModel):
    """How a profile runs one of params.yaml's `methods` (a Table 1 baseline): its model, and its training
    (none for a training-free method), with per-auxiliary-dataset overrides where the authors trained so."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: dict[str, Any] = Field(description="the method's config fields (moeclip/methods/<method>.py), all of "
                                              "them: its network and its losses")
    train: TrainConfig | None = Field(description="null = training-free (evaluated as built)")
    train_by_auxiliary: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="`train` overrides for one auxiliary dataset (April-GAN: 3 epochs on MVTec)")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    runs: Path = Field(Path("runs"), description="checkpoints and results go to <runs>/<profile>/...")
    reports: Path = Field(Path("reports"), description="rendered tables and figures go to <reports>/<profile>/")
    device: str = Field("auto", description="'auto' = cuda when available, else cpu")
    runtime: RuntimeConfig = RuntimeConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    experiments: dict[str, ExperimentSelection] = Field(
        default_factory=dict, description="per-experiment reduced sweeps or profile-specific variants")
    methods: dict[str, MethodSettings] = Field(
        default_factory=dict, description="the Table 1 baselines' settings in this profile, by method name")

    @property
    def layout(self) -> RunLayout:
        """Where this profile's data, runs and reports live."""
        data = self.data.root if self.data.root is not None else Path("data") / self.name
        return RunLayout(data=data, runs=self.runs / self.name, reports=self.reports / self.name)


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where available
    """YAML loader that rejects a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` brings in defaults that explicit keys may override
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def params_values(document: dict[str, Any], keys: list[str]) -> list[Any]:
    """The values at dotted params.yaml keys (None where a key is absent; the empty key is the whole file)."""
    values = []
    for key in keys:
        if not key:
            values.append(document)
            continue
        value: Any = document
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values.append(value)
    return values


def read_params(path: Path) -> dict[str, Any]:
    """The parsed params file; errors name the file."""
    path = Path(path)
    try:
        document = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ParamsError(f"params file '{path}' does not exist") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"params file '{path}' is not valid YAML: {err}") from None
    if not isinstance(document, dict):
        raise ParamsError(f"params file '{path}' must hold a mapping at the top level")
    return document


def profile_from_params(document: dict[str, Any], path: Path, name: str | None = None) -> Profile:
    """The profile `name` (default: the one the top-level `profile` key names, what `dvc repro` runs)
    of an already parsed params file, validated; errors name the file and the field."""
    name = name or document.get("profile")
    if not isinstance(name, str):
        raise ParamsError(f"params file '{path}' has no top-level `profile: <name>` entry")
    profiles = document.get("profiles") or {}
    if name not in profiles:
        raise ParamsError(f"params file '{path}' has no profile '{name}' (it has: {', '.join(profiles) or 'none'})")
    try:
        return Profile.model_validate({"name": name, **(profiles[name] or {})})
    except ValidationError as err:
        raise ParamsError(f"profile '{name}' in '{path}' is invalid: {validation_problems(err)}") from None


def validation_problems(error: ValidationError) -> str:
    """A validation error on one line: each field's dotted path and what is wrong with it (names as written:
    only the message's first letter is lowered)."""
    return "; ".join(": ".join(filter(None, (".".join(str(part) for part in problem["loc"]),
                                             problem["msg"][:1].lower() + problem["msg"][1:])))
                     for problem in error.errors())


def load_profile(path: Path, name: str | None = None) -> Profile:
    """The profile `name` (default: the active one) of params file `path` (see `profile_from_params`)."""
    return profile_from_params(read_params(path), Path(path), name)
