"""The same stages give the same results: across processes, thread counts and warm or cold starts.

One short demo training (1 epoch on the synthetic VisA) and its evaluation on MVTec run as
real `moeclip stage` processes three times: 1 thread (the demo's) in fresh processes, 1 thread
through the warm stage server, 2 threads through it. Same thread count: identical bytes. Other thread count:
the same metrics to the last printed decimal. An experiment stage gives the same bytes whether its
variants run one at a time or in two worker processes.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from benchmarks.bench_pipeline import stage_environment, wait_for_server
from moeclip.bench import warm
from moeclip.bench.dvcfile import stages_code
from moeclip.bench.params import RuntimeConfig
from moeclip.bench.stages import get_stage
from moeclip.bench.units import in_processes

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


MAIN_RESULTS = "runs/demo/metrics/evaluate/visa/mvtec.json"


def _experiment(source: Path, folder: Path, workers: int) -> tuple[dict, dict[str, bytes]]:
    """Table 9's demo variants ('1' trains, '1, 3, 5' is the main training) in a copy of `source`."""
    shutil.copytree(source, folder)
    document = yaml.safe_load((folder / "params.yaml").read_text())
    document["profiles"]["demo"]["runtime"]["workers"] = workers
    document["profiles"]["demo"]["experiments"]["table9"] = {"only": ["1", "3", "1, 3, 5"]}
    (folder / "params.yaml").write_text(yaml.safe_dump(document))
    result = _run_experiment(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = {path.relative_to(folder).as_posix(): path.read_bytes()
                   for path in sorted((folder / "runs/demo/experiments/table9").rglob("checkpoint.pt"))}
    return json.loads((folder / "runs/demo/metrics/experiments/table9.json").read_text()), checkpoints


def _run_experiment(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["moeclip", "stage", "experiment", "table9"], cwd=folder, capture_output=True, text=True,
                          env={**_environment(folder, False), "MOECLIP_WARM": "0"}, timeout=600)


def test_an_experiment_gives_the_same_bytes_with_one_or_two_workers_and_reuses_main_results(runs, tmp_path):
    source = runs["cold-1"][0].parents[4]
    one_metrics, one_checkpoints = _experiment(source, tmp_path / "one", 1)
    two_metrics, two_checkpoints = _experiment(source, tmp_path / "two", 2)
    assert list(one_metrics) == ["1", "3", "1, 3, 5"]  # the params' order, whatever order the workers finish in
    assert len(one_checkpoints) == 2  # '1' and '3' trained; '1, 3, 5' is the main training
    assert json.dumps(two_metrics) == json.dumps(one_metrics)
    assert two_checkpoints == one_checkpoints
    assert two_metrics["1, 3, 5"] == {"mvtec": json.loads((source / MAIN_RESULTS).read_text())}
    variants = tmp_path / "two/runs/demo/experiments/table9/variants"
    evaluated = {path.relative_to(variants).parts[0] for path in variants.glob("*/results/*/*.json")}
    assert evaluated == {"1", "3"}  # the default row was read from the main results, not evaluated again
    client = MlflowClient(f"sqlite:///{tmp_path / 'one/mlflow.db'}")
    names = [run.info.run_name for run in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert len(names) == len(set(names))  # a variant's training and its evaluation on each dataset are told apart
    assert {"train/table9/1", "evaluate/table9/1/mvtec", "train/table9/3", "evaluate/table9/3/mvtec",
            "train/visa", "model/visa", "evaluate/visa/mvtec"} == set(names)
    (tmp_path / "two" / MAIN_RESULTS).unlink()  # a default row without its main results: said before any training
    missing = _run_experiment(tmp_path / "two")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: experiment 'table9' reuses main results that are missing: {MAIN_RESULTS} "
        f"(run `dvc repro` for the evaluate stages first)")


def _threads_and_pid(_: int) -> tuple[int, int]:
    return torch.get_num_threads(), os.getpid()


@pytest.mark.parametrize("busy_thread", [False, True])
def test_workers_keep_the_order_and_the_stage_threads_forked_or_spawned(busy_thread):
    """A process with other threads (a Prefect task) spawns its workers; they still get the pinned thread count."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    if busy_thread:
        other.start()
    two = RuntimeConfig(threads=1, workers=2, measure_time=False)
    try:
        results = in_processes(_threads_and_pid, [(n,) for n in range(4)], two)
    finally:
        stop.set()
    assert [threads for threads, _ in results] == [1, 1, 1, 1]
    assert os.getpid() not in {pid for _, pid in results} and len({pid for _, pid in results}) <= 2
    assert in_processes(pow, [(2, 3), (3, 2), (5, 1)], two) == [8, 9, 5]
    assert in_processes(_threads_and_pid, [(0,)], two)[0][1] == os.getpid()  # a single call runs here


def test_where_time_is_measured_each_call_has_a_process_of_its_own():
    """Its wall time and peak memory are then its own, whatever ran before or beside it."""
    results = in_processes(_threads_and_pid, [(n,) for n in range(3)], RuntimeConfig(threads=1, workers=2))
    pids = [pid for _, pid in results]
    assert len(set(pids)) == 3 and os.getpid() not in pids


def test_threads_follow_the_profile(tmp_path):
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert document["profiles"]["demo"]["runtime"]["threads"] == 1
    script = ("from moeclip.bench.cli import _profile; import torch; from pathlib import Path; "
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


def test_kept_evaluations_follow_the_evaluation_code(tmp_path):
    """A variant's kept results are keyed by the code that computed them, so an edit there re-evaluates."""
    from moeclip.bench.stages.common import PACKAGE_FOLDER, code_digest
    from moeclip.bench.stages.results import EVALUATION_CODE

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/auc.py").write_text("AUC = 1\n")
    (tmp_path / "cost.py").write_text("FLOPS = 2\n")
    before = code_digest(tmp_path, ("metrics", "cost.py"))
    (tmp_path / "unrelated.py").write_text("x = 1\n")
    assert code_digest(tmp_path, ("metrics", "cost.py")) == before
    (tmp_path / "metrics/auc.py").write_text("AUC = 2\n")
    assert code_digest(tmp_path, ("metrics", "cost.py")) != before
    # Every such path is in the experiment stage's code stamp, so DVC re-runs it after an edit there.
    code = stages_code([get_stage("experiment")])["experiment"]
    assert {f"moeclip/{path}" for path in EVALUATION_CODE} <= set(code)
    assert all((PACKAGE_FOLDER / path).exists() for path in EVALUATION_CODE)


def test_a_finished_training_made_with_other_training_code_is_trained_again(tmp_path):
    """Its checkpoint records the digest of the code that decides its weights; another digest makes it stale."""
    from moeclip.bench.experiments import load_plan, main_run
    from moeclip.bench.stages.common import PACKAGE_FOLDER
    from moeclip.bench.stages.trained import TRAINING_CODE, checkpoint_state, training_code
    from moeclip.checkpoint import annotate_checkpoint, save_checkpoint
    from moeclip.methods.moeclip import build_model

    _, profile = load_plan(ROOT / "params.yaml")
    run = main_run(profile, "visa")
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(run.model, seed=0), 0, train_config=run.train.model_dump(mode="json"),
                    progress={"complete": False})
    assert checkpoint_state(checkpoint, run) == "partial"  # resumed, whatever the code
    annotate_checkpoint(checkpoint, progress={"complete": True})
    assert checkpoint_state(checkpoint, run) == "stale"  # finished, but by unknown code
    annotate_checkpoint(checkpoint, training_code=training_code())
    assert checkpoint_state(checkpoint, run) == "complete"
    annotate_checkpoint(checkpoint, training_code="0" * 16)
    assert checkpoint_state(checkpoint, run) == "stale"
    code = stages_code([get_stage("train")])["train"]
    assert {f"moeclip/{path}" for path in TRAINING_CODE} <= set(code)  # and DVC re-runs the stage after an edit
    assert all((PACKAGE_FOLDER / path).exists() for path in TRAINING_CODE)
