"""The demo's wall time through the flow on 1 and on 2 workers, measured in one run, and their ratio.

Each worker count runs the whole demo profile through `pipelines.flow.zsad_benchmark` in its own fresh
clone of the working tree (no data: the flow synthesises it), against one Prefect server started for
the run, on the chosen engine (`local`: a process pool; `ray`: a Ray cluster the flow starts). Each run
also says whether its reports/demo equals the working tree's, file for file, and whether `dvc status`
is clean after `dvc commit -f` (what docs/several-machines.md tells users to run after a flow run).

    .venv/bin/python -m benchmarks.bench_workers --engine local --out reports/pipeline-time/workers-<machine>.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.bench_pipeline import clone_working_tree

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen:
    """A Prefect server on 127.0.0.1:`port`, once it answers."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    until = time.monotonic() + 120
    while time.monotonic() < until:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the Prefect server did not start in 120 s")


def run_demo(clone: Path, api: str, engine: str, workers: int, timeout: float) -> float:
    """Seconds the whole demo profile takes through the flow in `clone`."""
    code = f"from pipelines.flow import zsad_benchmark; zsad_benchmark(engine={engine!r}, workers={workers})"
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}", "MOECLIP_WARM": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"the demo on {workers} worker(s) failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def same_reports(clone: Path) -> bool:
    """Whether the clone's reports/demo holds exactly the working tree's files, byte for byte."""
    ours, theirs = clone / "reports/demo", Path(__file__).resolve().parents[1] / "reports/demo"
    names = sorted(path.name for path in theirs.iterdir())
    return sorted(path.name for path in ours.iterdir()) == names and \
        all((ours / name).read_bytes() == (theirs / name).read_bytes() for name in names)


def dvc_clean_after_commit(clone: Path) -> bool:
    """`dvc commit -f` then `dvc status`: whether DVC would recompute nothing."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(clone)}
    subprocess.run(["dvc", "commit", "-f", "-q"], cwd=clone, env=env, check=True, capture_output=True)
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, check=True, capture_output=True, text=True)
    return "up to date" in status.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    seconds: dict[int, float] = {}
    checks: dict[int, dict[str, bool]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as folder:
        port = free_port()
        server = start_server(Path(folder) / "prefect", port)
        try:
            for workers in args.workers:
                clone = clone_working_tree(Path(folder) / f"clone-{workers}", leave_out=("reports/",))
                seconds[workers] = round(run_demo(clone, f"http://127.0.0.1:{port}/api", args.engine, workers,
                                                  args.timeout), 1)
                checks[workers] = {"same_reports": same_reports(clone), "dvc_clean": dvc_clean_after_commit(clone)}
                print(f"{args.engine}, {workers} worker(s): {seconds[workers]:.0f} s; {checks[workers]}", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    first = args.workers[0]
    ratios = {workers: round(seconds[first] / value, 2) for workers, value in seconds.items()}
    for workers, ratio in ratios.items():
        print(f"speed-up of {workers} worker(s) over {first}: {ratio:.2f}x")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "engine": args.engine,
              "seconds": seconds, "speedup": ratios, "checks": checks}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
