"""Trainings the stages and the command line share: a run's checkpoint kept, resumed or retrained, a main
training and its calibration, the main trainings' checkpoints, and a run's parameter counts."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from moeclip.bench.experiments import Run, main_run
from moeclip.bench.params import Profile
from moeclip.bench.stages.common import PACKAGE_FOLDER, code_digest
from moeclip.bench.workflows import calibrate_checkpoint, train_model
from moeclip.checkpoint import OutdatedCheckpointError, annotate_checkpoint, read_checkpoint
from moeclip.errors import MoeclipError
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.registry import method_of

# The code that decides a training's weights: a finished training made with other code is trained again.
TRAINING_CODE = ("methods", "training.py", "losses.py", "backbone.py", "config.py", "configs",
                 "data/dataset.py", "data/transforms.py")


@functools.cache
def training_code() -> str:
    return code_digest(PACKAGE_FOLDER, TRAINING_CODE)


def checkpoint_state(checkpoint: Path, run: Run) -> str:
    """'complete', 'partial' (resumable), 'stale' (another configuration: the method's own config or the generic
    train config; another format or training code) or 'missing'."""
    if not checkpoint.is_file():
        return "missing"
    try:
        payload = read_checkpoint(checkpoint)
    except OutdatedCheckpointError:
        return "stale"
    if payload.get("model_config") != run.model.model_dump(mode="json") or \
            payload.get("train_config") != run.train.model_dump(mode="json"):
        return "stale"
    if not payload.get("progress", {}).get("complete"):
        return "partial"
    return "complete" if payload.get("training_code") == training_code() else "stale"


@dataclass(frozen=True)
class Trained:
    """A run's checkpoint, and its model when this process just trained it (None when the checkpoint was kept)."""

    checkpoint: Path
    model: ZeroShotMethod | None


def ensure_trained(profile: Profile, run: Run, checkpoint: Path, run_name: str,
                   tags: Mapping[str, str] | None = None, max_steps: int | None = None) -> Trained:
    """The run's `checkpoint`: kept if complete, resumed if interrupted, retrained if stale; `max_steps` stops
    a training early (resumable)."""
    state = checkpoint_state(checkpoint, run)
    if state == "complete":
        return Trained(checkpoint, None)
    if state == "stale":
        checkpoint.unlink()
    result = train_model(profile, run.model, run.train, run.train_on, checkpoint, run_name, tags, max_steps)
    annotate_checkpoint(result.checkpoint, training_code=training_code())
    return Trained(result.checkpoint, result.model)


def train_and_calibrate(profile: Profile, run: Run, checkpoint: Path, tags: Mapping[str, str] | None = None,
                        max_steps: int | None = None) -> Path:
    """A main training (`ensure_trained`), calibrated on its auxiliary data once it is complete (the fixed
    scale of `moeclip predict`'s scores) with the model still in memory; the one path of stage train,
    `moeclip train` and `moeclip demo`. Returns the checkpoint."""
    trained = ensure_trained(profile, run, checkpoint, f"train/{run.name}", tags, max_steps)
    if checkpoint_state(checkpoint, run) == "complete" and "calibration" not in read_checkpoint(checkpoint):
        calibrate_checkpoint(checkpoint, {name: profile.layout.manifest(name) for name in run.train_on},
                             profile.tracking, profile.device, profile.runtime.eval_batch_size, f"model/{run.name}",
                             trained.model)
    return checkpoint


def main_checkpoint(profile: Profile, auxiliary: str) -> Path:
    """The finished checkpoint of a main training, or one line saying which stage to run first."""
    checkpoint = profile.layout.checkpoint(auxiliary)
    if checkpoint_state(checkpoint, main_run(profile, auxiliary)) != "complete":
        raise MoeclipError(f"'{checkpoint}' is missing or unfinished: run `dvc repro train@{auxiliary}` "
                           f"(or `moeclip stage train {auxiliary}`) first")
    return checkpoint


def model_parameters(model: BaseModel) -> dict[str, float]:
    """Total and trainable parameters (M) of a method's configuration (counts do not depend on its weights)."""
    counts = method_of(model).count_parameters(model)
    return {"params_m": counts["total"] / 1e6, "trainable_m": counts["trainable"] / 1e6}
