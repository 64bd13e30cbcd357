"""benchmarks/bench_pipeline.py's `dvc repro` runner: per-stage times, and a time limit that names the stage it stopped."""
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_pipeline import by_kind, run_repro

BIN = Path(sys.executable).parent


def test_a_repro_past_its_limit_names_the_running_stage(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  quick:\n    cmd: echo done > quick.txt\n    outs: [quick.txt]\n"
        "  slow:\n    cmd: sleep 120\n    deps: [quick.txt]\n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    repro = run_repro(tmp_path, timeout=20)
    assert repro.timed_out_in == "slow"
    assert list(repro.stages) == ["quick", "slow"] and repro.seconds < 40
    assert repro.returncode != 0


def test_stage_times_are_grouped_by_kind():
    grouped = by_kind({"fetch@a": 1.0, "fetch@b": 3.0, "report": 2.0})
    assert grouped == {"fetch": {"stages": 2, "total_s": 4.0, "mean_s": 2.0},
                       "report": {"stages": 1, "total_s": 2.0, "mean_s": 2.0}}
