"""The cluster's tracking server (moeclip.bench.tracking_server): one real `mlflow server` with basic-auth on a
loopback port refuses requests without the right credentials and takes runs logged with MLflow's standard
client variables."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from moeclip.bench.tracking import start_run
from moeclip.bench.tracking_server import (ADMIN_PASSWORD_VAR, ADMIN_USERNAME_VAR, AUTH_CONFIG_VAR, SECRET_KEY_VAR,
                                           server_environment, start_tracking_server, stop_tracking_server,
                                           wait_until_up)
from moeclip.errors import MoeclipError
from server_processes import free_port

ADMIN = ("zsad-admin", "not-a-real-secret-0")  # made up for this test
HOSTNAME = "head"  # a name the nodes would use; the server is told to accept it
SERVER_START_S = 90  # ~13 s on two idle cores
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    artifacts: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One authenticated server for the module: state and artifacts in a temporary folder, one worker,
    no job runner and no telemetry (not needed here, and slower to start)."""
    folder = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    env = {**os.environ, ADMIN_USERNAME_VAR: ADMIN[0], ADMIN_PASSWORD_VAR: ADMIN[1],
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    process = start_tracking_server(folder / "state", folder / "shared" / "mlartifacts", host="127.0.0.1",
                                    port=port, hostnames=[HOSTNAME], workers=1, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(url, process, SERVER_START_S)
        except MoeclipError as error:
            pytest.fail(f"{error}:\n{(folder / 'state' / 'server.log').read_text()[-3000:]}")
        yield Server(url, port, folder / "shared" / "mlartifacts")
    finally:
        stop_tracking_server(process)


def _request(url: str, auth: tuple[str, str] | None = None, body: dict | None = None,
             host: str | None = None) -> tuple[int, dict | str]:
    """An HTTP request (POST with a JSON body, else GET): the status and the decoded JSON (or text)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _search_experiments(server: Server, **kwargs) -> tuple[int, dict | str]:
    return _request(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=10", **kwargs)


def test_a_request_without_credentials_is_refused(server: Server):
    status, _ = _search_experiments(server)
    assert status == 401


def test_the_admin_credentials_are_accepted(server: Server):
    status, answer = _search_experiments(server, auth=ADMIN)
    assert status == 200
    assert "experiments" in answer


def test_a_wrong_password_is_refused(server: Server):
    status, _ = _search_experiments(server, auth=(ADMIN[0], "wrong-password-123"))
    assert status == 401


def test_the_hostname_the_nodes_use_is_accepted_and_an_unknown_one_refused(server: Server):
    assert _search_experiments(server, auth=ADMIN, host=f"{HOSTNAME}:{server.port}")[0] == 200
    assert _search_experiments(server, auth=ADMIN, host=f"elsewhere.example:{server.port}")[0] == 403


def test_start_run_with_mlflow_credentials_logs_a_run_the_server_lists(server: Server, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    note = tmp_path / "note.txt"
    note.write_text("logged through the server")
    with start_run("cluster-test", "node-1-unit", server.url, {"model": {"lora_rank": 8}}) as run:
        run.log_losses(0, {"loss": 1.5})
        run.log_artifact(note)
    status, experiment = _request(f"{server.url}/api/2.0/mlflow/experiments/get-by-name"
                                  f"?experiment_name=cluster-test", auth=ADMIN)
    assert status == 200
    experiment_id = experiment["experiment"]["experiment_id"]
    status, found = _request(f"{server.url}/api/2.0/mlflow/runs/search", auth=ADMIN,
                             body={"experiment_ids": [experiment_id]})
    assert status == 200
    [listed] = found["runs"]
    assert listed["info"]["run_id"] == run.run_id
    assert listed["info"]["run_name"] == "node-1-unit"
    assert listed["info"]["status"] == "FINISHED"
    assert {"key": "model.lora_rank", "value": "8"} in listed["data"]["params"]
    # The artifact went through the server into its artifact folder, the shared path.
    [stored] = list(server.artifacts.rglob("note.txt"))
    assert stored.read_text() == "logged through the server"


def test_start_run_with_a_wrong_password_fails(server: Server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    with pytest.raises(MlflowException, match="401|not authenticated"):
        with start_run("cluster-test", "refused", server.url, {"split": "test"}):
            pass


def test_the_environment_needs_admin_credentials_and_writes_no_secret(tmp_path: Path):
    with pytest.raises(MoeclipError, match=f"set {ADMIN_USERNAME_VAR} and {ADMIN_PASSWORD_VAR} "):
        server_environment(tmp_path, {})
    with pytest.raises(MoeclipError, match=f"set {ADMIN_PASSWORD_VAR} "):
        server_environment(tmp_path, {ADMIN_USERNAME_VAR: ADMIN[0]})
    with pytest.raises(MoeclipError, match=f"{ADMIN_PASSWORD_VAR} is shorter than the 12 characters"):
        server_environment(tmp_path, {ADMIN_USERNAME_VAR: ADMIN[0], ADMIN_PASSWORD_VAR: "short"})
    env = server_environment(tmp_path, {ADMIN_USERNAME_VAR: ADMIN[0], ADMIN_PASSWORD_VAR: ADMIN[1]})
    config = Path(env[AUTH_CONFIG_VAR])
    assert config == tmp_path.resolve() / "basic_auth.ini"
    assert f"database_uri = sqlite:///{tmp_path.resolve() / 'basic_auth.db'}" in config.read_text()
    assert ADMIN[0] not in config.read_text() and ADMIN[1] not in config.read_text()
    assert len(env[SECRET_KEY_VAR]) >= 32
    kept = server_environment(tmp_path, {ADMIN_USERNAME_VAR: ADMIN[0], ADMIN_PASSWORD_VAR: ADMIN[1],
                                         SECRET_KEY_VAR: "shared-by-every-server"})
    assert kept[SECRET_KEY_VAR] == "shared-by-every-server"
