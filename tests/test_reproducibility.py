"""The same stages give the same results: across processes, thread counts and warm or cold starts.

One short demo training (1 epoch on the synthetic VisA) and its evaluation on MVTec run as
real `moeclip stage` processes three times: 1 thread (the demo's) in fresh processes, 1 thread
through the warm stage server, 2 threads through it. Same thread count: identical bytes. Other thread count:
the same metrics to the last printed decimal.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.bench_pipeline import stage_environment, wait_for_server
from moeclip import warm

ROOT = Path(__file__).resolve().parents[1]


def _environment(folder: Path, warm_start: bool) -> dict[str, str]:
    """The stage processes' environment (this checkout's package, a warm-server folder beside `folder`)."""
    env = {**stage_environment(folder, warm_start), "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    return env


def _stages(folder: Path, threads: int, warm_start: bool) -> tuple[Path, dict]:
    """Fetch, prepare, train on VisA and evaluate on MVTec in `folder`; the checkpoint and the metrics."""
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    demo = document["profiles"]["demo"]
    demo["train"].update(epochs=1)
    demo["runtime"]["threads"] = threads
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(document))
    env = _environment(folder, warm_start)
    commands = [["fetch", "visa"], ["fetch", "mvtec"], ["prepare", "visa"], ["prepare", "mvtec"],
                ["train", "visa"], ["evaluate", "visa", "mvtec"]]
    for command in commands:
        result = subprocess.run(["moeclip", "stage", *command], cwd=folder, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
        if warm_start and command == ["fetch", "visa"]:
            wait_for_server(folder)  # the first command started it; training and evaluation run in it
    metrics = json.loads((folder / "runs/demo/metrics/evaluate/visa/mvtec.json").read_text())
    return folder / "runs/demo/train/visa/checkpoint.pt", metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("repro")
    return {"cold-1": _stages(root / "cold-1", 1, False), "warm-1": _stages(root / "warm-1", 1, True),
            "warm-2": _stages(root / "warm-2", 2, True)}


def test_same_thread_count_gives_identical_bytes_warm_or_cold(runs):
    (cold, cold_metrics), (warm_run, warm_metrics) = runs["cold-1"], runs["warm-1"]
    assert cold.read_bytes() == warm_run.read_bytes()
    assert cold_metrics == warm_metrics


def test_other_thread_count_gives_the_same_printed_numbers(runs):
    (one, one_metrics), (two, two_metrics) = runs["warm-1"], runs["warm-2"]
    assert one_metrics == two_metrics  # x100 with one decimal, as the tables print them
    weights_two = torch.load(two, weights_only=False)["weights"]
    weights_one = torch.load(one, weights_only=False)["weights"]
    # Not bit-equal: sums split over another number of threads round differently.
    assert max((weights_two[k] - weights_one[k]).abs().max().item() for k in weights_two) < 1e-3


def test_threads_follow_the_profile(tmp_path):
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert document["profiles"]["demo"]["runtime"]["threads"] == 1
    script = ("from moeclip.cli import _profile; import torch; from pathlib import Path; "
              "_profile(Path('params.yaml'), 'demo'); print(torch.get_num_threads(), "
              "torch.are_deterministic_algorithms_enabled())")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    output = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.split()
    assert output == ["1", "True"]


def test_the_server_key_changes_when_a_module_changes(tmp_path, monkeypatch):
    before = warm.server_key()
    module = Path(warm.__file__)
    stat = module.stat()
    try:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert warm.server_key() != before
    finally:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert warm.server_key() == before
    assert warm.server_key({**os.environ, "DVC_STAGE": "train@visa"}) == before  # set per stage by DVC
    assert warm.server_key({**os.environ, "HF_HUB_OFFLINE": "0"}) != warm.server_key({**os.environ,
                                                                                      "HF_HUB_OFFLINE": "1"})


def test_a_warm_stage_reports_errors_and_exit_status_like_a_fresh_process(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = _environment(tmp_path, warm_start=True)

    def fetch_unknown() -> tuple[int, str]:
        result = subprocess.run(["moeclip", "stage", "fetch", "nosuchset"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        return result.returncode, result.stderr.strip().splitlines()[-1]

    cold = fetch_unknown()  # runs in its own process and starts the server
    wait_for_server(tmp_path)
    assert cold[0] == 2 and "unknown dataset 'nosuchset'" in cold[1]
    assert fetch_unknown() == cold
