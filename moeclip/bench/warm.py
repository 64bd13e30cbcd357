"""Warm start for pipeline stages: one preloaded process forks a fresh child for each `moeclip stage` command.

Every DVC stage is its own `moeclip stage ...` process, and importing torch, open_clip and MLflow
costs 6-13 s, far more than a demo stage's work. The first stage command starts a server that
imports those modules once and waits on a Unix socket; later stage commands hand it their
arguments, working directory, environment and standard streams, and it forks a child that runs
the command as a fresh process would: the fork happens before any computation (no thread pool,
no RNG draws, no CUDA), and the child resets torch's default generator to its start-up seed.

The server's socket is named after the interpreter, `sys.path`, the environment and the size and
modification time of every file of the package, so an edited module is never run from a stale
import: the next command simply starts another server. A server exits after `IDLE_SECONDS`
without work. Linux only (fork); `MOECLIP_WARM=0` turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IDLE_SECONDS = 30.0
STARTUP_SECONDS = 300.0  # longer than any import takes, even beside a busy neighbour
# Besides every stage's module: MLflow's SQL store, imported on first use. The server pays for them once.
PRELOAD = ("mlflow.store.tracking.sqlalchemy_store",)
# Set per stage by DVC, or by the shell: they do not change what an import does.
VOLATILE_ENV = ("DVC_STAGE", "PWD", "OLDPWD", "_", "SHLVL")
# What a user's Ctrl-C or a scheduler's stop sends the client: passed on to the child that does the work.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!Q")
_PACKAGE = Path(__file__).resolve().parents[1]  # the whole moeclip package


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("MOECLIP_WARM", "1") != "0"


def server_key(environ: dict[str, str] | None = None) -> str:
    """Identifies what a server has imported: interpreter, import path, environment and package files."""
    environ = dict(os.environ if environ is None else environ)
    for name in VOLATILE_ENV:
        environ.pop(name, None)
    files = sorted(f"{path.relative_to(_PACKAGE)}:{stat.st_mtime_ns}:{stat.st_size}"
                   for path in _PACKAGE.rglob("*") if path.is_file() and "__pycache__" not in path.parts
                   for stat in [path.stat()])
    identity = json.dumps([sys.executable, sys.path, sorted(environ.items()), files])
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def socket_path(key: str) -> Path:
    """Where the server for `key` listens: in MOECLIP_WARM_DIR, by default a per-user folder of the temp dir."""
    folder = os.environ.get("MOECLIP_WARM_DIR") or Path(tempfile.gettempdir()) / f"moeclip-warm-{os.getuid()}"
    return Path(folder) / f"{key}.sock"


# -- client --------------------------------------------------------------------------------------
def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def run_command(argv: list[str]) -> int | None:
    """Run `moeclip <argv>` in a warm child and return its exit status.

    None means no server ran it (none is up, or it was shutting down): the caller runs the command
    itself, and a server is started in the background for the next command.
    """
    key = server_key()
    path = socket_path(key)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        _start_server(path)
        return None
    with connection:
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(connection, [_HEADER.pack(len(request))], [0, 1, 2])
        connection.sendall(request)
        pid = _read_exactly(connection, _HEADER.size)
        if pid is None:  # the server closed without running it
            return None
        child = _HEADER.unpack(pid)[0]
        forward = lambda signum, _frame: os.kill(child, signum)  # noqa: E731
        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
        try:
            status = _read_exactly(connection, _HEADER.size)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if status is None:
        print(f"error: the warm stage process {child} ended without an exit status "
              f"(killed?); rerun with MOECLIP_WARM=0 to run the stage in its own process", file=sys.stderr)
        return 1
    return _HEADER.unpack(status)[0]


def _starting_marker(path: Path) -> Path:
    return path.with_suffix(".starting")


def _start_server(path: Path) -> None:
    """Start a detached server that listens on `path` (it exits by itself when idle), unless one is starting.

    The marker file, created atomically, lets only one of several commands that find no server start
    one; a marker older than STARTUP_SECONDS is left from a server that died while importing.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    marker = _starting_marker(path)
    try:
        if time.time() - marker.stat().st_mtime > STARTUP_SECONDS:
            marker.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    # -P: no working directory in front of the import path; the server then takes the client's own path.
    subprocess.Popen([sys.executable, "-P", "-m", "moeclip.bench.warm", str(path), json.dumps(sys.path)],
                     stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                     close_fds=True)


# -- server --------------------------------------------------------------------------------------
def _listen(path: Path) -> socket.socket | None:
    """Bind the socket, replacing a stale one; None if a live server already holds it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            probe.close()
            listener.close()
            return None  # another server answers there
        except OSError:
            path.unlink(missing_ok=True)
            listener.bind(str(path))
    listener.listen(16)
    return listener


def _run_child(connection: socket.socket) -> None:
    """In the forked child: take over the client's streams, directory and environment, run, report."""
    header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 3)
    header += _read_exactly(connection, _HEADER.size - len(header)) or b""
    request = json.loads(_read_exactly(connection, _HEADER.unpack(header)[0]) or b"{}")
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout.reconfigure(line_buffering=True)  # the server's own stdout was /dev/null, block-buffered
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["moeclip", *request["argv"]]
    connection.sendall(_HEADER.pack(os.getpid()))

    import torch

    torch.random.default_generator.manual_seed(torch.initial_seed())  # as a fresh process starts
    from moeclip.bench.launch import run_here

    try:
        run_here(request["argv"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then the status
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    connection.sendall(_HEADER.pack(code))
    os._exit(code)


def forget_package() -> None:
    """Drop the package's own modules (torch, MLflow and the rest stay imported): each child imports again
    what its stage uses (0.1 s), so the package files a stage records as its code are its own."""
    for name in [name for name in sys.modules if name == "moeclip" or name.startswith("moeclip.")]:
        del sys.modules[name]


def serve(path: Path, import_path: list[str]) -> None:
    """Import every stage's module and `PRELOAD` (from the client's `import_path`), then fork a child per
    connection until idle."""
    import importlib

    sys.path[:] = import_path
    try:
        from moeclip.bench.stages import STAGES

        for name in (*(stage.module for stage in STAGES), *PRELOAD):
            importlib.import_module(name)
        from sqlalchemy.orm import configure_mappers

        configure_mappers()  # MLflow's ORM classes, set up on first use otherwise (0.6 s in every stage)
        forget_package()
        listener = _listen(path)
    finally:
        _starting_marker(path).unlink(missing_ok=True)
    if listener is None:
        return
    listener.settimeout(IDLE_SECONDS)
    children: set[int] = set()
    try:
        while True:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                children = {pid for pid in children if os.waitpid(pid, os.WNOHANG) == (0, 0)}
                if not children:
                    return
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                _run_child(connection)
            connection.close()
            children.add(pid)
            children = {pid for pid in children if os.waitpid(pid, os.WNOHANG) == (0, 0)}
    finally:
        listener.close()
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), json.loads(sys.argv[2]))
