"""An MLflow tracking server for a cluster: one server on the head node that every node logs to over HTTP,
with MLflow's basic authentication on.

    # head node; the admin user is created from these the first time the server starts
    export MLFLOW_AUTH_ADMIN_USERNAME=zsad MLFLOW_AUTH_ADMIN_PASSWORD='at least 12 characters'
    python -m moeclip.bench.tracking_server --state ~/zsad-tracking \
        --artifacts /shared/zsad-bench/runs/mlartifacts --host 0.0.0.0 --port 5000 --hostname head
    # every node: MLflow's clients send these with each request
    export MLFLOW_TRACKING_USERNAME=zsad MLFLOW_TRACKING_PASSWORD='at least 12 characters'

What goes where:
- runs, params and metrics: a SQLite file in `state` (`mlflow.db`). Only the server process writes it,
  so it may live on the head node's own disk; the nodes reach it through the server.
- users and permissions: another SQLite file in `state` (`basic_auth.db`), named by the auth config
  file `state/basic_auth.ini` that MLflow reads from $MLFLOW_AUTH_CONFIG_PATH. That file holds no
  credentials: the admin's come from $MLFLOW_AUTH_ADMIN_USERNAME / $MLFLOW_AUTH_ADMIN_PASSWORD
  (MLflow's own variables, read only while the admin user does not exist yet).
- artifacts (tables, figures, models): `artifacts`, on the shared path. Clients upload and download them
  through the server (`mlflow-artifacts:/` URIs), so the server's authentication covers them too.

MLflow also needs $MLFLOW_FLASK_SERVER_SECRET_KEY (the sign-up form's CSRF protection); where it is unset
a random one is made for this server's processes, which only invalidates open sign-up pages on restart.
The server answers only requests whose Host header it knows: localhost and private IP addresses (MLflow's
default) and the `hostnames` given, the names nodes put in their tracking URI (http://head:5000).
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from moeclip.bench.processes import stop_group
from moeclip.errors import MoeclipError

ADMIN_USERNAME_VAR = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_VAR = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CONFIG_VAR = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_KEY_VAR = "MLFLOW_FLASK_SERVER_SECRET_KEY"
MIN_PASSWORD_LENGTH = 12  # MLflow's basic-auth refuses shorter passwords
AUTH_CONFIG = """\
[mlflow]
# Written by moeclip.bench.tracking_server; credentials come from the environment, never from here.
default_permission = READ
database_uri = {database_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def write_auth_config(state: Path) -> Path:
    """`state/basic_auth.ini`: MLflow's auth settings with the user database in `state`; returns its path."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    path = state / "basic_auth.ini"
    path.write_text(AUTH_CONFIG.format(database_uri=f"sqlite:///{state / 'basic_auth.db'}"))
    return path


def _allowed_hosts(hostnames: Sequence[str]) -> list[str]:
    """MLflow's default Host headers (localhost, private IPs) plus each name, with or without a port."""
    from mlflow.server.security_utils import get_default_allowed_hosts  # slow import, only where needed

    return [*get_default_allowed_hosts(), *(host for name in hostnames for host in (name, f"{name}:*"))]


def server_command(state: Path, artifacts: Path, host: str, port: int, hostnames: Sequence[str] = (),
                   workers: int = 4) -> list[str]:
    """`mlflow server` (of this interpreter) with basic-auth, its run store in `state` and the artifacts
    in `artifacts`, listening on `host`:`port`."""
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"sqlite:///{state.resolve() / 'mlflow.db'}",
               "--artifacts-destination", str(artifacts.resolve()),
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if hostnames:
        command += ["--allowed-hosts", ",".join(_allowed_hosts(hostnames))]
    return command


def server_environment(state: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the auth config file written and named, and a secret key;
    refuses admin credentials that are missing or that MLflow would refuse."""
    env = dict(os.environ if env is None else env)
    missing = [name for name in (ADMIN_USERNAME_VAR, ADMIN_PASSWORD_VAR) if not env.get(name)]
    if missing:
        raise MoeclipError(f"the tracking server's admin credentials come from the environment: set "
                           f"{' and '.join(missing)} (the password at least {MIN_PASSWORD_LENGTH} characters)")
    if len(env[ADMIN_PASSWORD_VAR]) < MIN_PASSWORD_LENGTH:
        raise MoeclipError(f"{ADMIN_PASSWORD_VAR} is shorter than the {MIN_PASSWORD_LENGTH} characters "
                           f"MLflow's basic-auth requires")
    env[AUTH_CONFIG_VAR] = str(write_auth_config(state))
    if not env.get(SECRET_KEY_VAR):
        env[SECRET_KEY_VAR] = secrets.token_urlsafe(32)
    return env


def start_tracking_server(state: Path, artifacts: Path, host: str = "0.0.0.0", port: int = 5000,
                          hostnames: Sequence[str] = (), workers: int = 4, log: Path | None = None,
                          env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start the server in the background, in its own process group (`stop_tracking_server` stops it and
    its workers), its output appended to `log` (default: `state/server.log`). It takes some seconds to
    answer: `wait_until_up`."""
    server_env = server_environment(state, env)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = log or state.resolve() / "server.log"
    with log.open("ab") as out:
        return subprocess.Popen(server_command(state, artifacts, host, port, hostnames, workers), env=server_env,
                                cwd=state.resolve(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once `url`/health answers; raise when the server exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MoeclipError(f"the tracking server exited with status {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise MoeclipError(f"the tracking server did not answer at {url} within {timeout_s:g} s; see its log")


def stop_tracking_server(process: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s` seconds."""
    stop_group(process, grace_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server in the foreground until it exits, Ctrl-C or SIGTERM (which stop it)."""
    parser = argparse.ArgumentParser(prog="python -m moeclip.bench.tracking_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True, help="folder of the run and user databases "
                                                                  "(the head node's own disk will do)")
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact folder, on the shared path")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--hostname", action="append", default=[],
                        help="a name the nodes reach this machine by (repeat for several)")
    parser.add_argument("--workers", type=int, default=4, help="server processes")
    args = parser.parse_args(argv)
    try:
        process = start_tracking_server(args.state, args.artifacts, args.host, args.port, args.hostname,
                                        args.workers)
    except MoeclipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"tracking server starting on {args.host}:{args.port}; log: {args.state.resolve() / 'server.log'}",
          file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped by a supervisor: stop the server too
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_tracking_server(process)


if __name__ == "__main__":
    sys.exit(main())
