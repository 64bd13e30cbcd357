"""The stage declarations (moeclip/bench/stages/): dvc.yaml is what they render, a stage's code what it imports."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.bench_pipeline import stage_environment
from moeclip.bench.dvcfile import PACKAGE_ROOT, folded, package_files, render, stages_code
from moeclip.bench.experiments import load_plan
from moeclip.bench.stages import STAGES, get_stage, plan_calls
from moeclip.bench.stages.common import code_digest

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_what_the_stage_declarations_render():
    benchmark, _ = load_plan(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == render(benchmark), "dvc.yaml is stale: run `moeclip dvc-yaml`"


def test_every_stage_has_a_module_with_its_run_and_dvc_names_its_calls():
    assert [stage.name for stage in STAGES] == ["stamps", "fetch", "prepare", "train", "evaluate", "baseline",
                                                "experiment", "analysis", "report"]
    assert all(callable(stage.function()) for stage in STAGES)
    assert get_stage("fetch").label({"dataset": "visa"}) == "fetch@visa"
    assert get_stage("evaluate").label({"auxiliary": "visa", "target": "mvtec"}) == "evaluate-visa@mvtec"
    assert get_stage("baseline").label({"method": "winclip"}) == "baseline@winclip"
    assert get_stage("analysis").label({}) == "analysis"
    with pytest.raises(ValueError, match="no stage 'nope'"):
        get_stage("nope")


def test_a_stages_code_is_the_package_files_it_imports_and_no_others():
    code = stages_code([get_stage(name) for name in ("fetch", "train", "report")])
    fetch, train, report = (set(code[name]) for name in ("fetch", "train", "report"))
    entry = {"moeclip/bench/launch.py", "moeclip/bench/warm.py", "moeclip/bench/stages/cli.py",
             "moeclip/bench/stages/__init__.py"}
    assert entry <= fetch & train & report
    assert {"moeclip/bench/stages/fetch.py", "moeclip/data/fetch.py", "moeclip/data/synthetic.py"} <= fetch
    assert not {path for path in fetch if path.startswith("moeclip/methods")} | {"moeclip/training.py"} & fetch
    assert {"moeclip/methods", "moeclip/training.py", "moeclip/losses.py", "moeclip/configs"} <= train
    assert "moeclip/data/fetch.py" not in train and "moeclip/bench/reports" not in train
    assert "moeclip/bench/reports" in report and "moeclip/methods" not in report


def test_a_folder_stands_for_its_files_only_when_all_of_them_are_listed(tmp_path):
    for name in ("a/x.py", "a/y.py", "a/b/z.py", "a/b/data.json", "c/w.py", "c/__pycache__/w.cpython-311.pyc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert package_files(tmp_path, "c") == {"c/w.py"}
    assert folded(["a/x.py", "a/y.py", "a/b/z.py", "a/b/data.json", "c/w.py"], tmp_path) == ["a", "c"]
    assert folded(["a/x.py", "a/b/z.py", "a/b/data.json"], tmp_path) == ["a/b", "a/x.py"]
    assert folded(["a/x.py", "a/b/z.py"], tmp_path) == ["a/b/z.py", "a/x.py"]


def test_package_data_belongs_to_the_module_that_reads_it():
    """Every non-Python file of the package is some module's data, so a stage that reads it depends on it."""
    from moeclip.bench.stages import PACKAGE_DATA

    data = {path.relative_to(PACKAGE_ROOT).as_posix() for path in (PACKAGE_ROOT / "moeclip").rglob("*")
            if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts}
    assert data == {file for files in PACKAGE_DATA.values() for file in files}


def test_a_stage_records_the_code_it_ran_which_is_what_its_stamp_lists(tmp_path):
    """The stamps stage stamps each call with the probe's files, their digest and the call's settings;
    `moeclip stage` keeps the package files it loaded in its usage record, the same files; every call depends
    on its stamp alone, and the stamps stage on the package and every setting."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {**stage_environment(tmp_path, warm=False), "PYTHONPATH": str(ROOT)}
    for command in (["moeclip", "stage", "stamps"], ["moeclip", "stage", "fetch", "btad"]):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    benchmark, _ = load_plan(tmp_path / "params.yaml")
    stamps = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "runs/demo/stamps").glob("*.json")
              if path.name != "_code.json"}
    assert set(stamps) == {stage.label(args) for stage, args in plan_calls(benchmark)}
    assert {"fetch@btad", "train@visa", "evaluate-visa@mvtec", "baseline@winclip", "report"} <= set(stamps)
    assert all(stamp["code"]["digest"] == code_digest(PACKAGE_ROOT, stamp["code"]["files"])
               for stamp in stamps.values())
    train, fetch = stamps["train@visa"], stamps["fetch@btad"]
    assert "moeclip/training.py" in train["code"]["files"] and "moeclip/training.py" not in fetch["code"]["files"]
    assert fetch["params"] == {"profiles.demo.data": yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]
                                                               ["demo"]["data"]}
    recorded = json.loads((tmp_path / "runs/demo/usage/fetch@btad.json").read_text())["code"]
    assert folded(recorded, PACKAGE_ROOT) == fetch["code"]["files"]
    dvc_stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # every setting as the file (5 lock lines), one tracked key so DVC treats it as a params file
    assert dvc_stages["stamps"]["deps"] == ["moeclip", "params.yaml"] and dvc_stages["stamps"]["params"] == ["profile"]
    assert dvc_stages["fetch"]["do"]["deps"] == ["runs/${profile}/stamps/fetch@${item}.json"]
    assert "params" not in dvc_stages["fetch"]["do"]
