"""Stage `train@<auxiliary>`: the profile's model trained on one auxiliary dataset, and its loss curves."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

import moeclip.bench.serving  # noqa: F401 - imported by the training and calibration jobs: the stage's code
import moeclip.bench.tracking  # noqa: F401
import moeclip.calibration  # noqa: F401
import moeclip.training  # noqa: F401
from moeclip.atomic import atomic_path
from moeclip.bench.experiments import main_run
from moeclip.bench.stages.common import computing_plan
from moeclip.bench.stages.trained import ensure_trained
from moeclip.bench.workflows import calibrate_checkpoint
from moeclip.checkpoint import read_checkpoint
from moeclip.errors import MoeclipError


def run(params: Path, auxiliary: str, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    if auxiliary not in benchmark.main.targets:
        raise MoeclipError(f"'{auxiliary}' is not a main training in '{params}' "
                           f"(main.targets: {', '.join(benchmark.main.targets)})")
    checkpoint = ensure_trained(profile, main_run(profile, auxiliary), profile.layout.checkpoint(auxiliary),
                                f"train/{auxiliary}", {"auxiliary": auxiliary})
    payload = read_checkpoint(checkpoint)
    if "calibration" not in payload:  # the fixed scale of `moeclip predict`'s scores (the history stays)
        calibrate_checkpoint(checkpoint, {auxiliary: profile.layout.manifest(auxiliary)}, profile.tracking,
                             profile.device, profile.runtime.eval_batch_size, f"model/{auxiliary}")
    with atomic_path(profile.layout.losses(auxiliary)) as temporary:  # the loss curves `dvc plots` draws
        pd.DataFrame(payload["history"]).to_csv(temporary, index=False)
    return checkpoint
