"""Stopping a server started in its own process group (a tracking server, a Prefect server, a test's server)."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s` seconds, so the server's children stop too."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
