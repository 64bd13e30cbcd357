"""Trainings the stages share: a run's checkpoint kept, resumed or retrained, the main trainings' checkpoints,
and a run's parameter counts."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from moeclip.bench.experiments import Run, main_run
from moeclip.bench.params import Profile
from moeclip.bench.stages.common import PACKAGE_FOLDER, code_digest
from moeclip.bench.workflows import train_model
from moeclip.checkpoint import OutdatedCheckpointError, annotate_checkpoint, read_checkpoint
from moeclip.errors import MoeclipError
from moeclip.methods.registry import method_of

# The code that decides a training's weights: a finished training made with other code is trained again.
TRAINING_CODE = ("model", "methods", "training.py", "losses.py", "backbone.py", "config.py", "configs",
                 "data/dataset.py", "data/transforms.py")


@functools.cache
def training_code() -> str:
    return code_digest(PACKAGE_FOLDER, TRAINING_CODE)


def checkpoint_state(checkpoint: Path, run: Run) -> str:
    """'complete', 'partial' (resumable), 'stale' (another configuration, format or training code) or 'missing'."""
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


def ensure_trained(profile: Profile, run: Run, checkpoint: Path, run_name: str,
                   tags: Mapping[str, str] | None = None) -> Path:
    """The run's `checkpoint`: kept if complete, resumed if interrupted, retrained if stale."""
    state = checkpoint_state(checkpoint, run)
    if state == "complete":
        return checkpoint
    if state == "stale":
        checkpoint.unlink()
    trained = train_model(profile, run.model, run.train, run.train_on, checkpoint, run_name, tags)
    annotate_checkpoint(trained, training_code=training_code())
    return trained


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
