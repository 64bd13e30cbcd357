"""params.yaml: named profiles, each a validated model + train + data + tracking configuration.

Every hyperparameter lives in params.yaml; code only reads it through `load_profile`.
Fields a profile leaves out take the paper's defaults from `ModelConfig` / `TrainConfig`.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeclip.config import ModelConfig, TrainConfig
from moeclip.errors import MoeclipError


class ParamsError(MoeclipError):
    """params.yaml is missing, malformed, or has no such profile."""


class DataConfig(BaseModel):
    """Where a profile's datasets live and which ones it trains and evaluates on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Field(Path("data"), description="raw datasets in <root>/raw/<name>, manifests in <root>/manifests")
    synthetic: bool = Field(False, description="generate the offline demo datasets instead of fetching")
    train: tuple[str, ...] = ("visa",)
    evaluate: tuple[str, ...] = ()

    def manifest(self, name: str) -> Path:
        return self.root / "manifests" / f"{name}.parquet"


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "zsad-bench"


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    runs: Path = Field(Path("runs"), description="checkpoints and results go to <runs>/<profile>/...")
    device: str = Field("auto", description="'auto' = cuda when available, else cpu")

    @property
    def run_dir(self) -> Path:
        return self.runs / self.name


def load_profile(path: Path, name: str) -> Profile:
    """The profile `name` of params file `path`, validated; errors name the file and the field."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params file '{path}' does not exist") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"params file '{path}' is not valid YAML: {err}") from None
    profiles = (document or {}).get("profiles") or {}
    if name not in profiles:
        raise ParamsError(f"params file '{path}' has no profile '{name}' (it has: {', '.join(profiles) or 'none'})")
    try:
        return Profile.model_validate({"name": name, **(profiles[name] or {})})
    except ValidationError as err:
        raise ParamsError(f"profile '{name}' in '{path}' is invalid:\n{err}") from None


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
