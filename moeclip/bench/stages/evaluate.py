"""Stage `evaluate-<auxiliary>@<target>`: zero-shot results of a main training on one target dataset."""
from __future__ import annotations

from pathlib import Path

import moeclip.bench.tracking  # noqa: F401 - imported by the evaluation job when it runs: the stage's code
import moeclip.evaluation  # noqa: F401
import moeclip.figures  # noqa: F401
from moeclip.bench.stages.common import computing_plan, summary_values, write_json
from moeclip.bench.stages.trained import main_checkpoint
from moeclip.bench.workflows import evaluate_checkpoint


def run(params: Path, auxiliary: str, target: str, profile_name: str | None = None) -> Path:
    _, profile = computing_plan(params, profile_name)
    summary = evaluate_checkpoint(main_checkpoint(profile, auxiliary), {target: profile.layout.manifest(target)},
                                  profile.layout.evaluation(auxiliary, target), profile.tracking, profile.device,
                                  profile.runtime.eval_batch_size,
                                  run_name=f"evaluate/{auxiliary}/{target}",
                                  tags={"auxiliary": auxiliary, "target": target, "profile": profile.name})
    metrics = profile.layout.evaluation_metrics(auxiliary, target)
    write_json(metrics, summary_values(summary)[target])  # flat: one row of `dvc metrics show`
    return metrics
