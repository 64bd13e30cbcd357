"""Helpers of the tests that start servers (MLflow, Prefect) as child processes on loopback ports."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from moeclip.bench.processes import stop_group  # noqa: F401 - the tests stop their servers with it


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_group(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`command` in its own process group, output to `log`, so that stopping it also stops its children."""
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
