"""The demo pipeline's wall time, stage by stage, with warm stage processes and without.

Each mode runs `dvc repro` from nothing in its own fresh clone of the working tree and times
every stage from DVC's "Running stage" lines. Start-up cost is measured on its own too: a cold
stage process imports what the stages import (torch, open_clip, MLflow's SQL store, the
package), a warm one is a round trip through the stage server (moeclip/bench/warm.py).

    .venv/bin/python -m benchmarks.bench_pipeline --out reports/pipeline-time/<machine>.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from moeclip.resources import USAGE_LINE  # what `moeclip stage` prints when it ends

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def clone_working_tree(destination: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """The working tree's tracked and new files as a git repository with them committed.

    Paths starting with one of `leave_out` are not copied; a clone made earlier is updated in place.
    """
    destination.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith(leave_out):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "clone",
                     "--allow-empty"]):
        subprocess.run(command, cwd=destination, check=True, capture_output=True)
    return destination


def stage_environment(clone: Path, warm: bool = True) -> dict[str, str]:
    """What `make demo` gives the stages (the venv first on PATH, no hub access), with the clone's own
    package and a warm-server socket folder of its own beside the clone."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1",
            "MOECLIP_WARM": "1" if warm else "0", "MOECLIP_WARM_DIR": str(warm_dir(clone)),
            "PYTHONUNBUFFERED": "1"}  # stage lines arrive as they are printed


def warm_dir(clone: Path) -> Path:
    return clone.parent / f"{clone.name}.warm"


def wait_for_server(clone: Path, limit: float = 120.0) -> None:
    """Until the clone's warm stage server listens (a command that found none started it)."""
    until = time.monotonic() + limit
    while not list(warm_dir(clone).glob("*.sock")):
        if time.monotonic() > until:
            raise TimeoutError(f"no warm stage server listens in {warm_dir(clone)} after {limit:.0f} s")
        time.sleep(0.2)


@dataclass
class Repro:
    """One `dvc repro`: exit status, output, and the wall time of each stage that ran, in order."""

    returncode: int
    output: str
    stages: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    timed_out_in: str | None = None  # the stage that was running when the time limit struck


def run_repro(clone: Path, timeout: float, warm: bool = True, args: tuple[str, ...] = (),
              echo: bool = False) -> Repro:
    """`dvc repro` in `clone`, stopped after `timeout` seconds (then `timed_out_in` names the running stage).

    `echo` prints each stage's start and its wall time and peak memory line as they come.
    """
    start = time.perf_counter()
    process = subprocess.Popen(["dvc", "repro", *args], cwd=clone, env=stage_environment(clone, warm),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    starts: list[tuple[str, float]] = []

    def read() -> None:  # a thread: a progress bar's unfinished line must not hold up the time limit
        for line in process.stdout:
            lines.append(line)
            match = STAGE_LINE.match(line)
            if match:
                starts.append((match.group(1), time.perf_counter()))
            if echo and (match or USAGE_LINE.match(line)):
                print(line.rstrip(), flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    end = time.perf_counter()
    reader.join(timeout=10)
    bounds = [moment for _, moment in starts[1:]] + [end]
    stages = {name: round(stop - begun, 2) for (name, begun), stop in zip(starts, bounds)}
    running = (starts[-1][0] if starts else "(before the first stage)") if timed_out else None
    return Repro(process.returncode, "".join(lines), stages, round(end - start, 2), running)


def startup_seconds(clone: Path, warm: bool, repeats: int = 3) -> float:
    """Best of `repeats`: a cold stage process importing what stages import, or a warm round trip."""
    env = stage_environment(clone, warm)
    if warm:
        command = ["moeclip", "stage", "--help"]
        subprocess.run(command, cwd=clone, env=env, capture_output=True)  # starts the server
        wait_for_server(clone)
    else:
        from moeclip.bench.stages import STAGES
        from moeclip.bench.warm import PRELOAD

        modules = (*(stage.module for stage in STAGES), *PRELOAD)
        command = [sys.executable, "-c", "import importlib\nfor m in %r: importlib.import_module(m)" % (modules,)]
    best = float("inf")
    for _ in range(repeats):
        begun = time.perf_counter()
        subprocess.run(command, cwd=clone, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - begun)
    return round(best, 3)


def by_kind(stages: dict[str, float]) -> dict[str, dict[str, float]]:
    """Stage times grouped by stage name before '@': count, total and mean seconds."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, seconds in stages.items():
        groups[name.split("@")[0]].append(seconds)
    return {kind: {"stages": len(times), "total_s": round(sum(times), 1), "mean_s": round(sum(times) / len(times), 2)}
            for kind, times in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    report: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "python": platform.python_version()}, "modes": {}}
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{mode}-") as folder:
            clone = clone_working_tree(Path(folder) / "clone", leave_out=("reports/",))
            startup = startup_seconds(clone, warm=mode == "warm")
            repro = run_repro(clone, args.timeout, warm=mode == "warm")
            if repro.returncode != 0:
                raise SystemExit(f"dvc repro ({mode}) failed:\n{repro.output[-3000:]}")
            report["modes"][mode] = {"startup_s": startup, "pipeline_s": repro.seconds,
                                     "stages_run": len(repro.stages), "by_kind": by_kind(repro.stages),
                                     "stages": repro.stages}
        print(f"{mode}: start-up {startup:.2f} s per stage; {len(repro.stages)} stages in {repro.seconds:.0f} s")
        for kind, row in report["modes"][mode]["by_kind"].items():
            print(f"  {kind:16s} {row['stages']:3d} stages  {row['total_s']:7.1f} s  ({row['mean_s']:.2f} s each)")
    modes = report["modes"]
    if {"cold", "warm"} <= set(modes):
        print(f"warm / cold pipeline time: {modes['warm']['pipeline_s'] / modes['cold']['pipeline_s']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
