"""The jobs a profile runs, logged to MLflow: prepare its data, train, calibrate, evaluate a checkpoint.

The command line and the pipeline's stages (moeclip/bench/stages/) call them with their own paths and
settings, so each job has exactly one implementation; a main training and its calibration are chained
once, in `moeclip.bench.stages.trained.train_and_calibrate`. Torch, the model and MLflow are imported
inside the functions that need them, so the data stages start fast.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import BaseModel

from moeclip.atomic import atomic_path, write_text_atomically
from moeclip.bench.params import Profile, TrackingConfig
from moeclip.config import TrainConfig
from moeclip.errors import MoeclipError
from moeclip.runtime import resolve_device

if TYPE_CHECKING:
    from moeclip.evaluation import Evaluation
    from moeclip.methods.base import ZeroShotMethod
    from moeclip.training import TrainResult


def fetch_profile_dataset(profile: Profile, dataset: str) -> Path:
    """The raw folder of one dataset: generated for a synthetic profile, else fetched (or found in place)."""
    from moeclip.data.fetch import fetch_dataset
    from moeclip.data.registry import get_dataset
    from moeclip.data.synthetic import generate_demo_dataset

    get_dataset(dataset)  # an unknown name fails here, in one line
    if profile.data.synthetic:
        data = profile.data
        return generate_demo_dataset(dataset, profile.layout.raw(dataset).parent, seed=data.seed,
                                     image_size=data.image_size, per_class=data.per_class, classes=data.classes,
                                     real_sizes=data.real_sizes)
    return fetch_dataset(dataset, profile.layout.raw(dataset).parent)


def prepare_profile_dataset(profile: Profile, dataset: str) -> Path:
    """Validate one fetched dataset into its manifest."""
    from moeclip.data.prepare import prepare_dataset

    raw = profile.layout.raw(dataset)
    if not raw.is_dir():
        raise MoeclipError(f"dataset folder '{raw}' is missing: run `moeclip data fetch {dataset}` first")
    prepare_dataset(dataset, raw, profile.layout.manifest(dataset))
    return profile.layout.manifest(dataset)


def prepare_profile_data(profile: Profile, datasets: Sequence[str]) -> dict[str, Path]:
    """Fetch (or generate) and prepare several datasets; returns their manifests."""
    unique = list(dict.fromkeys(datasets))
    for dataset in unique:
        fetch_profile_dataset(profile, dataset)
    return {dataset: prepare_profile_dataset(profile, dataset) for dataset in unique}


def read_manifests(manifests: Mapping[str, Path]) -> pd.DataFrame:
    from moeclip.data.manifest import read_manifest

    missing = [str(path) for path in manifests.values() if not Path(path).is_file()]
    if missing:
        raise MoeclipError(f"manifest(s) {', '.join(missing)} missing: run `moeclip data prepare` first")
    return pd.concat([read_manifest(path) for path in manifests.values()], ignore_index=True)


def train_model(profile: Profile, model: BaseModel, settings: TrainConfig, train_on: Sequence[str],
                checkpoint: Path, run_name: str, tags: Mapping[str, str] | None = None,
                max_steps: int | None = None) -> TrainResult:
    """Train one configuration on the auxiliary dataset(s) into `checkpoint`, logging to MLflow.

    Resumes an interrupted run from `checkpoint`.
    """
    from moeclip.bench.tracking import start_run
    from moeclip.training import train

    manifests = {name: profile.layout.manifest(name) for name in train_on}
    frame = read_manifests(manifests)
    params = {"model": model.model_dump(mode="json"), "train": settings.model_dump(mode="json"),
              "train_on": list(train_on), "profile": profile.name}
    with start_run(profile.tracking.experiment, run_name, profile.tracking.uri, params=params,
                   tags={"stage": "train", "profile": profile.name, **(tags or {})}) as run:
        run.log_manifest_hashes(manifests)
        result = train(model, settings, frame, checkpoint, resolve_device(profile.device), max_steps=max_steps,
                       log=run.log_losses)
        run.log_artifact(result.checkpoint)
    return result


def calibrate_checkpoint(checkpoint: Path, manifests: Mapping[str, Path], tracking: TrackingConfig, device: str,
                         batch_size: int, run_name: str, model: ZeroShotMethod | None = None) -> str:
    """Store in `checkpoint` the calibration (moeclip/calibration.py) of its model on `manifests`, the data it
    was trained on (the fixed scale of `moeclip predict`'s scores), and log the calibrated model to MLflow
    as a pyfunc model for `mlflow models serve`; returns that model's `runs:/` URI. `model`: the checkpoint's
    model already in memory (just trained), else it is loaded."""
    from moeclip.bench.serving import log_served_model
    from moeclip.bench.tracking import start_run
    from moeclip.calibration import calibrate
    from moeclip.checkpoint import load_model, store_calibration

    device = resolve_device(device)
    model = load_model(checkpoint, device)[0] if model is None else model.to(device).eval()
    calibration = calibrate(model, read_manifests(manifests), batch_size, device)
    store_calibration(checkpoint, calibration)
    with start_run(tracking.experiment, run_name, tracking.uri, params={"checkpoint": str(checkpoint)},
                   tags={"stage": "calibrate"}) as run:
        run.log_params({"calibration": calibration.as_dict()})
        run.log_manifest_hashes(manifests)
        return log_served_model(run, checkpoint)


def untrained_checkpoint(model: BaseModel, seed: int, path: Path) -> Path:
    """A checkpoint of the freshly initialised method (the 'before training' baseline, vanilla CLIP, or a
    training-free method such as WinCLIP)."""
    from moeclip.checkpoint import save_checkpoint
    from moeclip.methods.registry import build_method

    save_checkpoint(path, build_method(model, seed=seed), seed)
    return path


def _write_results(evaluation: Evaluation, summary: pd.DataFrame, out_dir: Path) -> None:
    per_class = evaluation.per_class
    with atomic_path(out_dir / "per_class.parquet") as temporary:
        per_class.to_parquet(temporary, index=False)
    with atomic_path(out_dir / "per_class.csv") as temporary:
        per_class.to_csv(temporary, index=False)
    write_text_atomically(out_dir / "summary.json", json.dumps(json.loads(summary.to_json(orient="index")), indent=2))


def _log_figures(run, evaluation: Evaluation, per_dataset_limit: int) -> None:
    from moeclip.data.transforms import read_image
    from moeclip.figures import anomaly_map_figure

    per_dataset: dict[str, int] = {}
    for example in evaluation.examples:
        if per_dataset.setdefault(example.dataset, 0) >= per_dataset_limit:
            continue
        per_dataset[example.dataset] += 1
        size = example.amap.shape[::-1]
        image = np.asarray(read_image(Path(example.path)).convert("RGB").resize(size))
        title = f"{example.dataset} / {example.class_name}: {Path(example.path).name}"
        run.log_figure(anomaly_map_figure(image, example.mask, example.amap, title),
                       f"{example.dataset}-{example.class_name}-{Path(example.path).stem}")


def evaluate_checkpoint(checkpoint: Path, manifests: Mapping[str, Path], out_dir: Path, tracking: TrackingConfig,
                        device: str, batch_size: int, run_name: str | None = None,
                        test_time: Mapping[str, object] | None = None,
                        tags: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Zero-shot evaluation of a checkpoint on manifests: result tables in `out_dir`, everything in MLflow.

    `test_time` overrides inference-only model fields (see `load_model`). Returns the
    per-dataset summary (means over classes, x100).
    """
    from moeclip.bench.tracking import start_run
    from moeclip.checkpoint import load_model
    from moeclip.evaluation import evaluate_frame, summarize

    device = resolve_device(device)
    frame = read_manifests(manifests)
    # The run is open while the work is done, so its duration in MLflow is the evaluation's.
    with start_run(tracking.experiment, run_name or Path(out_dir).name, tracking.uri,
                   params={"checkpoint": str(checkpoint)}, tags={"stage": "evaluate", **(tags or {})}) as run:
        model, _ = load_model(checkpoint, device, test_time)
        run.log_params({"model": model.config.model_dump(mode="json")})
        run.log_manifest_hashes(manifests)
        evaluation = evaluate_frame(model, frame, batch_size=batch_size, device=device, examples_per_class=1)
        summary = summarize(evaluation.per_class)
        _write_results(evaluation, summary, Path(out_dir))
        run.log_metrics_table(evaluation.per_class, summary)
        _log_figures(run, evaluation, tracking.figures_per_dataset)
    return summary
