"""The Prefect flow: its stage selection and cache keys (no server), and a served deployment run end to end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from moeclip.bench.experiments import load_plan
from moeclip.bench.stages import get_stage
from server_processes import free_port, start_group, stop_group
from pipelines.caching import StageCache, outputs_exist
from moeclip.bench.stages import waits_for
from pipelines.plan import plan_stages

REPO = Path(__file__).resolve().parents[1]

SMALL_PARAMS = """
profile: tiny
datasets: [mvtec, visa, btad, brainmri, headct]
main:
  auxiliary: visa
  targets:
    visa: [mvtec, btad, brainmri, headct]
    mvtec: [visa]
    brainmri: [headct]
methods:
  winclip: {label: WinCLIP, published: WinCLIP}
profiles:
  tiny:
    analysis: {similarity_dataset: mvtec, statistics_dataset: brainmri}
experiments:
  industrial:
    title: One test set
    render: table
    datasets: [mvtec]
    variants: {"default": {}, "untrained": {trained: false}}
  medical:
    title: Trained on a medical set
    render: table
    datasets: [headct]
    variants: {"medical": {train_on: [brainmri]}}
"""


@pytest.fixture
def small_params(tmp_path: Path) -> Path:
    """SMALL_PARAMS with the demo profile's network and training (a profile must name every value)."""
    document = yaml.safe_load(SMALL_PARAMS)
    demo = yaml.safe_load((REPO / "params.yaml").read_text())["profiles"]["demo"]
    document["profiles"]["tiny"].update(model=demo["model"], train=demo["train"],
                                        methods={"winclip": demo["methods"]["winclip"]})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_a_dataset_subset_keeps_only_the_stages_it_can_feed(small_params: Path) -> None:
    benchmark, profile = load_plan(small_params)
    plan = plan_stages(benchmark, profile, datasets=["visa", "mvtec"])
    assert plan.datasets == ("mvtec", "visa")  # params order, whatever the order asked
    assert plan.trainings == ("visa", "mvtec")
    assert plan.evaluations == (("visa", "mvtec"), ("mvtec", "visa"))
    assert plan.experiments == ("industrial",)  # `medical` reads headct and trains on brainmri
    assert plan.methods == ()  # a baseline runs Table 1's protocol: every auxiliary dataset and target
    assert not plan.analysis and not plan.complete


def test_the_full_plan_runs_everything_and_may_report(small_params: Path) -> None:
    benchmark, profile = load_plan(small_params)
    plan = plan_stages(benchmark, profile)
    assert plan.datasets == benchmark.datasets
    assert plan.trainings == ("visa", "mvtec", "brainmri")
    assert len(plan.evaluations) == 6
    assert plan.experiments == ("industrial", "medical")
    assert plan.methods == ("winclip",)
    assert plan.analysis and plan.complete
    assert not plan_stages(benchmark, profile, experiments=[]).complete


def test_explicit_selections_are_checked(small_params: Path) -> None:
    benchmark, profile = load_plan(small_params)
    assert plan_stages(benchmark, profile, ["mvtec", "visa"], experiments=[]).experiments == ()
    with pytest.raises(ValueError, match=r"'medical' needs datasets .*\['brainmri', 'headct'\]"):
        plan_stages(benchmark, profile, ["mvtec", "visa"], experiments=["medical"])
    with pytest.raises(ValueError, match="unknown datasets \\['nope'\\]"):
        plan_stages(benchmark, profile, ["nope"])
    with pytest.raises(ValueError, match="unknown experiments \\['nope'\\]"):
        plan_stages(benchmark, profile, experiments=["nope"])


def test_cache_keys_follow_the_stages_declared_inputs(small_params: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key changes with the files a stage reads, the params keys it declares and its code; nothing else."""
    monkeypatch.chdir(small_params.parent)
    benchmark, profile = load_plan(small_params)
    raw = profile.layout.raw("visa")
    raw.mkdir(parents=True)
    (raw / "image.png").write_bytes(b"one")

    def key(stage: str) -> str | None:
        inputs = {"params": small_params, "dataset": "visa", "profile_name": "tiny"}
        return StageCache(stage=stage).compute_key(None, inputs, {})

    stamp = profile.layout.stamp("prepare@visa")  # the call's code and settings, as the stamps stage stamps them
    stamp.parent.mkdir(parents=True)
    stamp.write_text('{"digest": "one"}')
    first, fetched = key("prepare"), key("fetch")
    assert key("prepare") == first
    stamp.write_text('{"digest": "other code"}')
    assert key("prepare") != first and key("fetch") == fetched
    first = key("prepare")
    (raw / "image.png").write_bytes(b"changed")
    assert key("prepare") != first and key("fetch") == fetched  # prepare reads the raw folder, fetch writes it
    document = yaml.safe_load(small_params.read_text())
    stamped = key("stamps")
    document["experiments"]["industrial"]["title"] = "Renamed"
    small_params.write_text(yaml.safe_dump(document, sort_keys=False) + "# an edit\n")
    assert key("fetch") == fetched  # fetch declares only the profile's data section
    assert key("stamps") != stamped  # the stamps stage depends on every setting
    document["profiles"]["tiny"]["data"] = {"per_class": 3}
    small_params.write_text(yaml.safe_dump(document, sort_keys=False))
    assert key("fetch") != fetched
    prepare = get_stage("prepare")
    assert not outputs_exist(prepare, benchmark, profile, {"dataset": "visa"})
    profile.layout.manifest("visa").parent.mkdir(parents=True)
    profile.layout.manifest("visa").write_bytes(b"")
    assert outputs_exist(prepare, benchmark, profile, {"dataset": "visa"})


def test_a_call_waits_for_the_calls_that_write_what_it_reads(small_params: Path) -> None:
    benchmark, profile = load_plan(small_params)
    plan = plan_stages(benchmark, profile)
    waits = waits_for(plan.calls(report=True), benchmark, profile.layout)
    assert waits.pop("stamps") == []
    assert all(calls[0] == "stamps" for calls in waits.values())  # every call reads its stamp
    waits = {label: calls[1:] for label, calls in waits.items()}
    assert waits["fetch@visa"] == []
    assert waits["prepare@visa"] == ["fetch@visa"]
    assert waits["train@visa"] == ["prepare@visa"]
    assert waits["evaluate-visa@mvtec"] == ["prepare@mvtec", "train@visa"]
    trainings = [f"train@{a}" for a in plan.trainings]
    evaluations = [f"evaluate-{a}@{t}" for a, t in plan.evaluations]
    prepares = [f"prepare@{d}" for d in plan.datasets]
    assert sorted(waits["experiment@medical"]) == sorted(prepares + trainings + evaluations)
    assert sorted(waits["analysis"]) == sorted(prepares + ["train@visa"])
    assert sorted(waits["baseline@winclip"]) == sorted(prepares)
    assert sorted(waits["report"]) == sorted(evaluations + ["baseline@winclip", "experiment@industrial",
                                                            "experiment@medical", "analysis"])
    assert "report" not in waits_for(plan.calls(report=False), benchmark, profile.layout)


# -- a served deployment, run to completion on a local Prefect server -----------------------------
def _get(url: str, body: dict | None = None) -> dict | list | None:
    """JSON of a GET (a POST when `body` is given), or None while the server is not answering (or answers 404)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _wait_for(what: str, probe: Callable[[], object], process: subprocess.Popen, log: Path,
              seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not ready after {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(2)


def _run_deployment(prefect: str, work: Path, env: dict[str, str], api: str, serve_log: Path) -> dict:
    """Run zsad-benchmark/demo on two datasets, no experiments, no report, as docs/prefect.md says; the finished run."""
    run = subprocess.run([prefect, "deployment", "run", "zsad-benchmark/demo",
                          "--param", 'datasets=["visa", "mvtec"]', "--param", "experiments=[]",
                          "--param", "report=false", "--watch"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{serve_log.read_text()[-5000:]}"
    return _get(f"{api}/flow_runs/{re.search(r'UUID: ([0-9a-f-]{36})', run.stdout).group(1)}")


def _task_states(api: str, flow_run_id: str) -> dict[str, str]:
    """Task run name -> final state name ('Completed', 'Cached', ...) of one flow run."""
    runs = _get(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {task_run["name"]: task_run["state"]["name"] for task_run in runs}


@pytest.mark.timeout(1800)
def test_served_deployment_runs_to_completion_then_from_cache(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["demo"]["train"]["epochs"] = 1  # the demo profile, trained briefly
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    prefect = str(Path(sys.executable).parent / "prefect")
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start_group([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                work, env, tmp_path / "server.log"))
        _wait_for("prefect server", lambda: _get(f"{api}/health"), processes[0], tmp_path / "server.log")
        processes.append(start_group([sys.executable, "-m", "pipelines.deploy"], work, env, tmp_path / "serve.log"))
        _wait_for("deployment zsad-benchmark/demo", lambda: _get(f"{api}/deployments/name/zsad-benchmark/demo"),
                  processes[1], tmp_path / "serve.log")

        first = _run_deployment(prefect, work, env, api, tmp_path / "serve.log")
        assert first["state"]["type"] == "COMPLETED"
        assert first["parameters"]["profile"] == "demo"
        assert set(_task_states(api, first["id"])) == {  # each unit's task named for the Prefect UI
            "stamps", "fetch/visa", "fetch/mvtec", "prepare/visa", "prepare/mvtec", "train/visa", "train/mvtec",
            "evaluate/visa/mvtec", "evaluate/mvtec/visa"}
        assert (work / "runs/demo/train/visa/checkpoint.pt").is_file()
        assert (work / "runs/demo/train/mvtec/checkpoint.pt").is_file()
        assert set(json.loads((work / "runs/demo/metrics/evaluate/visa/mvtec.json").read_text())) == {
            "image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"}
        assert (work / "runs/demo/metrics/evaluate/mvtec/visa.json").is_file()
        assert not (work / "reports").exists()  # a partial run renders no report

        (work / "runs/demo/metrics/evaluate/visa/mvtec.json").unlink()
        second = _run_deployment(prefect, work, env, api, tmp_path / "serve.log")
        assert second["state"]["type"] == "COMPLETED"
        states = _task_states(api, second["id"])
        assert states.pop("evaluate/visa/mvtec") == "Completed"  # its output was gone: run again
        assert set(states.values()) == {"Cached"}
        assert (work / "runs/demo/metrics/evaluate/visa/mvtec.json").is_file()
    finally:
        for process in reversed(processes):
            stop_group(process, 30)


def test_a_ray_run_on_several_nodes_refuses_a_file_based_tracking_store(small_params: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from moeclip.errors import MoeclipError
    from pipelines.flow import _check_cluster

    _, profile = load_plan(small_params)
    assert profile.tracking.uri.startswith("sqlite:")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(MoeclipError, match=r"^tracking URI 'sqlite:[^']*' is a SQLite database file, which 2 nodes"):
        _check_cluster("ray", profile)
    _check_cluster("local", profile)  # one machine: any store
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    _check_cluster("ray", profile)
