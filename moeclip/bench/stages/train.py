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
from moeclip.bench.stages.trained import train_and_calibrate
from moeclip.checkpoint import read_checkpoint
from moeclip.errors import MoeclipError


def run(params: Path, auxiliary: str, profile_name: str | None = None) -> Path:
    benchmark, profile = computing_plan(params, profile_name)
    if auxiliary not in benchmark.main.targets:
        raise MoeclipError(f"'{auxiliary}' is not a main training in '{params}' "
                           f"(main.targets: {', '.join(benchmark.main.targets)})")
    checkpoint = train_and_calibrate(profile, main_run(profile, auxiliary), profile.layout.checkpoint(auxiliary),
                                     {"auxiliary": auxiliary})
    payload = read_checkpoint(checkpoint)
    with atomic_path(profile.layout.losses(auxiliary)) as temporary:  # the loss curves `dvc plots` draws
        pd.DataFrame(payload["history"]).to_csv(temporary, index=False)
    return checkpoint
