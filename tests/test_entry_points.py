"""The README's test command sets up everything it needs on a fresh machine, and CI runs just that command."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_make_browser_installs_chromium_with_apt_where_it_is_missing(tmp_path: Path) -> None:
    stubs, calls = tmp_path / "bin", tmp_path / "apt-get.calls"
    stubs.mkdir()
    _stub(stubs, "apt-get", f'echo "$@" >> {calls}')
    _stub(stubs, "sudo", 'exec "$@"')  # as CI runs as root, sudo is not needed; a developer's shell may need it
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["make", "-s", "browser", "CHROMIUM=chromium-absent-from-path"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["update", "install -y chromium"]


def test_make_browser_installs_nothing_where_chromium_is_on_path(tmp_path: Path) -> None:
    stubs, calls = tmp_path / "bin", tmp_path / "apt-get.calls"
    stubs.mkdir()
    _stub(stubs, "apt-get", f'echo "$@" >> {calls}')
    _stub(stubs, "my-chromium", "exit 0")
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["make", "-s", "browser", "CHROMIUM=my-chromium"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not calls.exists()


def test_make_test_gets_the_browser_and_ci_adds_nothing_to_it() -> None:
    dry_run = subprocess.run(["make", "-n", "test", "CHROMIUM=chromium-absent-from-path"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr
    assert "apt-get install -y chromium" in dry_run.stdout
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert not [command for command in commands if re.search(r"\b(apt-get|apt|pip|sudo)\b", command)]
