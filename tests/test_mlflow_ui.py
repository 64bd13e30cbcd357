"""The MLflow UI lists the runs `moeclip.bench.tracking` logs: a real `mlflow server` on a SQLite store,
rendered by headless Chromium (the UI is a React app, so the HTML that the server sends has no runs in it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moeclip.bench.tracking import start_run
from server_processes import free_port, start_group, stop_group

EXPERIMENT = "ui-test"
RUN_NAMES = ("demo-train", "demo-eval")
SERVER_START_S = 90  # ~17 s on two idle cores; generous for a loaded CI machine
CHROMIUM_S = 60  # ~6 s measured
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")  # MLflow's own SQLAlchemy use


@pytest.fixture
def chromium() -> str:
    """Chromium's path; missing Chromium is a failure, not a skip, so CI cannot pass without this check."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed; `make test` (or `make browser`) installs it")
    return path


@pytest.fixture
def logged_store(tmp_path: Path) -> tuple[str, str]:
    """A SQLite store holding RUN_NAMES, logged the way the project logs runs; returns (uri, experiment id)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = (tmp_path / "artifacts").as_uri()
    with start_run(EXPERIMENT, RUN_NAMES[0], uri, {"model": {"lora_rank": 8}}, artifact_location=artifacts) as run:
        run.log_losses(0, {"loss": 1.5})
    with start_run(EXPERIMENT, RUN_NAMES[1], uri, {"split": "test"}, artifact_location=artifacts) as run:
        run.log_losses(0, {"auroc": 0.9})
    return uri, MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id


def _wait_until_up(server: subprocess.Popen, base_url: str, log: Path) -> None:
    """Poll /health until it answers; fail early (with the server's log) when the server exits."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    pytest.fail(f"mlflow server did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def mlflow_ui(logged_store: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    """`mlflow server` from this venv on a free loopback port; yields the experiment's runs-page URL.

    Job execution (a farm of huey workers) and telemetry are off: the UI needs neither. The
    server runs in its own process group so that teardown also stops its uvicorn child."""
    uri, experiment_id = logged_store
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1"}
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
               "--artifacts-destination", str(tmp_path / "served-artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = start_group(command, tmp_path, env, log)
    try:
        _wait_until_up(server, base_url, log)
        yield f"{base_url}/#/experiments/{experiment_id}/runs"
    finally:
        stop_group(server, 15)


def _rendered_dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran and fetched the runs (virtual time lets them settle)."""
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=CHROMIUM_S)
    assert done.returncode == 0, f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


def test_ui_lists_logged_runs(chromium: str, mlflow_ui: str, tmp_path: Path) -> None:
    dom = _rendered_dom(chromium, mlflow_ui, tmp_path / "chromium-profile")
    page = tmp_path / "runs-page.html"
    page.write_text(dom)
    missing = [name for name in RUN_NAMES if name not in dom]
    assert not missing, f"runs {missing} not listed at {mlflow_ui}; rendered page saved as {page}"
