"""MLflow run logging: flattened params, git commit, manifest hashes, metric tables, losses, figures.

Everything goes through an explicit `MlflowClient` bound to one tracking URI rather than
MLflow's fluent API, so no process-global active run or tracking URI is changed (two
runs, or tests, cannot interfere) and none of the fluent API's side effects run (system
metrics thread, git/source context tags, the "View run at" print). The default store is
a SQLite file, which `mlflow ui --backend-store-uri sqlite:///mlflow.db` reads without a
server.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from moeclip.bench.params import TrackingConfig
from moeclip.data.manifest import manifest_sha256
from moeclip.errors import MoeclipError
from moeclip.figures import save_figure

try:
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
    from mlflow.tracking import MlflowClient
except ImportError as missing:  # the library installs without the benchmark application
    raise MoeclipError(f"logging to MLflow needs the benchmark extra: pip install 'moeclip[benchmark]' ({missing})") \
        from None

MAX_PARAM_VALUE_LENGTH = 6000  # MLflow rejects longer param values
TRUNCATION_MARK = "...[truncated]"
GIT_COMMIT_TAG = "git_commit"
NON_METRIC_COLUMNS = frozenset({"dataset", "class_name", "n_images", "n_anomalous"})
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
_NOISY_LOGGERS = ("alembic", "mlflow.store.db.utils")
LOSS_BATCH = 600  # loss values per MLflow call (its limit is 1000 metrics per batch)


def sanitize_key(key: str) -> str:
    """MLflow metric/param keys allow only alphanumerics and `_ - . / space`; others become `_`."""
    return _UNSAFE_KEY_CHARS.sub("_", key)


def _param_value(value: object) -> str:
    """A param as text: sequences as JSON (readable, comparable), the rest via `str`, capped in length."""
    if isinstance(value, (list, tuple)):
        text = json.dumps(list(value), default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return text


def flatten_params(nested: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config sections as MLflow params (`{"model": {"lora_rank": 8}}` -> `{"model.lora_rank": "8"}`),
    because MLflow params are a flat string-to-string table."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[sanitize_key(name)] = _param_value(value)
    return flat


def _git(repo: Path | None, *args: str) -> str:
    """Output of one git command in `repo` (or the current directory); raises when it fails."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD's hash, with `-dirty` when the work tree has changes, to tie a run to its code;
    None outside a repository or without git (tracking must never fail because of it)."""
    try:
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = bool(_git(repo, "status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def tracking_uri_default() -> str:
    """The params schema's default store (a SQLite file in the current directory: no server, and
    `mlflow ui` opens it directly), for runs started without a profile."""
    return TrackingConfig.model_fields["uri"].default


# Schemes of stores that live in files on one machine. Only one node can write them safely: SQLite's locks
# do not hold on network filesystems, and the file store has none.
_LOCAL_SCHEMES = {"": "a local directory", "file": "a local directory", "sqlite": "a SQLite database file"}


def check_tracking_for_cluster(uri: str, nodes: int) -> None:
    """Refuse a tracking URI that the nodes of a cluster cannot share: on more than one node, a store in
    local files (`sqlite:`, `file:`, or a plain path such as `mlruns`) would be written by several
    processes on several machines at once. Servers (`http(s)://`, `databricks`) and database servers
    (`postgresql://`, `mysql://`, ...) are accepted; on one node, anything is."""
    if nodes <= 1:
        return
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+")[0]  # `sqlite+pysqlite` is SQLite
    if uri.strip().lower() == "databricks" or scheme not in _LOCAL_SCHEMES:
        return
    raise MoeclipError(
        f"tracking URI {uri!r} is {_LOCAL_SCHEMES[scheme]}, which {nodes} nodes cannot write safely at once; "
        f"use an MLflow tracking server instead: start one on the head node and set the profile's "
        f"tracking.uri to its http(s):// address, e.g. http://head:5000 (see docs/several-machines.md)")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metrics(values: Mapping[str, float], step: int) -> list[Metric]:
    """Metric entities for the finite values only: NaN means "does not apply", not a result."""
    timestamp = _now_ms()
    return [Metric(sanitize_key(key), float(value), timestamp, step)
            for key, value in values.items() if value is not None and math.isfinite(float(value))]


def _metric_columns(per_class: pd.DataFrame) -> list[str]:
    """The numeric columns that are metrics, not identifiers or counts (so new metrics need no edit here)."""
    return [column for column in per_class.select_dtypes("number").columns if column not in NON_METRIC_COLUMNS]


def _per_class_values(per_class: pd.DataFrame, metrics: list[str]) -> dict[str, float]:
    """`<dataset>.<class>.<metric>` for every cell of the per-class table."""
    return {f"{row['dataset']}.{row['class_name']}.{metric}": row[metric]
            for _, row in per_class.iterrows() for metric in metrics}


def _summary_values(summary: pd.DataFrame) -> dict[str, float]:
    """`<dataset>.<metric>` for every cell of the summary (index: dataset, already x100)."""
    return {f"{dataset}.{metric}": value
            for dataset, row in summary.iterrows() for metric, value in row.items()}


def _write_tables(folder: Path, per_class: pd.DataFrame, summary: pd.DataFrame | None) -> None:
    """The tables in the formats people and scripts read: CSV, parquet (typed), JSON."""
    per_class.to_csv(folder / "per_class.csv", index=False)
    per_class.to_parquet(folder / "per_class.parquet", index=False)
    if summary is not None:
        summary.to_csv(folder / "summary.csv")
        summary.to_json(folder / "summary.json", orient="index", indent=2)


class RunLogger:
    """Logs into one open MLflow run; obtained from `start_run`."""

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._pending_losses: list[Metric] = []

    def log_params(self, params: Mapping) -> None:
        """Nested params, flattened."""
        flat = flatten_params(params)
        self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in flat.items()])

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Tags (values as text) label runs for search; unlike params they may be changed later."""
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_manifest_hashes(self, manifests: Mapping[str, Path]) -> None:
        """Each manifest's sha256 as param `manifest.<name>.sha256`, to pin the exact data evaluated."""
        self.log_params({"manifest": {name: {"sha256": manifest_sha256(Path(path))}
                                      for name, path in manifests.items()}})

    def log_metrics_table(self, per_class: pd.DataFrame, summary: pd.DataFrame | None,
                          step: int | None = None) -> None:
        """Per-class metrics (fractions) and dataset means (x100, from `summary`) as metrics, NaN
        skipped, plus the tables themselves as artifacts."""
        values = _per_class_values(per_class, _metric_columns(per_class))
        if summary is not None:
            values.update(_summary_values(summary))
        self.client.log_batch(self.run_id, metrics=_metrics(values, step or 0))
        with tempfile.TemporaryDirectory() as folder:
            _write_tables(Path(folder), per_class, summary)
            self.client.log_artifacts(self.run_id, folder)

    def log_losses(self, step: int, losses: Mapping[str, float]) -> None:
        """One training step's losses (a curve per key in the UI), sent in batches of about
        LOSS_BATCH values: a call per step costs as much as a small model's training step."""
        self._pending_losses += _metrics(losses, step)
        if len(self._pending_losses) >= LOSS_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the losses not sent yet (`start_run` does so when the run ends)."""
        if self._pending_losses:
            self.client.log_batch(self.run_id, metrics=self._pending_losses)
            self._pending_losses = []

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts, under `artifact_path` if given."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_python_model(self, python_model: object, artifacts: Mapping[str, Path], requirements: list[str],
                         name: str = "model") -> str:
        """A pyfunc model (an `mlflow.pyfunc.PythonModel` and its files) in this run; returns its
        `runs:/<run id>/<name>` URI, what `mlflow models serve -m` takes."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pyfunc.log_model(name=name, python_model=python_model, pip_requirements=requirements,
                                    artifacts={key: str(path) for key, path in artifacts.items()})
        return f"runs:/{self.run_id}/{name}"

    def log_figure(self, fig: Figure, name: str) -> None:
        """The figure as `figures/<name>.png` (the figure is closed afterwards)."""
        filename = name if name.endswith(".png") else f"{name}.png"
        with tempfile.TemporaryDirectory() as folder:
            self.log_artifact(save_figure(fig, Path(folder) / filename), "figures")


def _quiet_mlflow() -> None:
    """SQLite schema migrations log at INFO on every new database; that is noise for users."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it when missing (tolerating a concurrent creator)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _final_status(error: BaseException | None) -> str:
    """FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


@contextmanager
def start_run(experiment: str, run_name: str, tracking_uri: str | None, params: Mapping,
              tags: Mapping | None = None, artifact_location: str | None = None) -> Iterator[RunLogger]:
    """Open a run with params, tags and the git commit logged; it ends FINISHED, or FAILED (KILLED on
    Ctrl-C) when the body raises, and the exception propagates.

    `tracking_uri` None means `$MLFLOW_TRACKING_URI`, else `tracking_uri_default()`.
    `artifact_location` is used only when the experiment is created here."""
    _quiet_mlflow()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri_default()
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(_experiment_id(client, experiment, artifact_location), run_name=run_name)
    logger = RunLogger(client, run.info.run_id, uri)
    error: BaseException | None = None
    try:
        commit = git_commit()
        logger.set_tags({**(tags or {}), **({GIT_COMMIT_TAG: commit} if commit else {})})
        logger.log_params(params)
        yield logger
    except BaseException as raised:
        error = raised
        raise
    finally:
        logger.flush()
        client.set_terminated(logger.run_id, status=_final_status(error), end_time=_now_ms())
