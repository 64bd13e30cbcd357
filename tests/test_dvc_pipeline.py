"""End to end: the demo profile through `dvc repro` in a temporary clone of the working tree.

One module-scoped run (a few minutes on 2 CPU cores) serves every check: the committed dvc.lock and
reports/demo reproduced to the byte, all tables with all rows, metrics and plots through DVC's own
commands, a second `dvc repro` doing nothing, every stage having run exactly the code its stamp lists,
and `dvc status` naming exactly the stages a params or module edit affects.
"""
import filecmp
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.bench_pipeline import clone_working_tree, run_repro, stage_environment
from moeclip.bench.dvcfile import folded
from moeclip.bench.experiments import experiment_runs, load_plan
from moeclip.bench.stages import STAMP_STAGE

# The whole demo pipeline, measured with benchmarks/bench_pipeline.py (reports/pipeline-time/): 336 s on
# 2 idle cores, 470 s with one core kept busy (experiments run two single-threaded variants at once).
# The limit allows four times the busy time, for a slower CI machine or one whose cores are both taken.
PIPELINE_S = 470
PIPELINE_LIMIT_S = 4 * PIPELINE_S
pytestmark = pytest.mark.timeout(PIPELINE_LIMIT_S + 900)  # the module fixture counts against the first test

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=stage_environment(cwd), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The working tree (committed dvc.lock included, reports left out) in a fresh git repository, after
    a full `dvc repro`."""
    clone = clone_working_tree(tmp_path_factory.mktemp("pipeline") / "clone", leave_out=("reports/",))
    repro = run_repro(clone, PIPELINE_LIMIT_S)
    assert repro.timed_out_in is None, (f"dvc repro passed its {PIPELINE_LIMIT_S} s limit in stage "
                                        f"{repro.timed_out_in}; stage times: {repro.stages}")
    assert repro.returncode == 0, f"dvc repro failed:\n{repro.output[-6000:]}"
    return clone


def _table_rows(path: Path) -> list[str]:
    """First cells of a Markdown table's body rows (first block only)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_reports_hold_every_table_with_all_rows(clone):
    benchmark, profile = load_plan(clone / "params.yaml")
    reports = clone / "reports" / "demo"
    table1 = _table_rows(reports / "table1.md")
    assert table1[:2] == ["MVTec-AD", "VisA"] and table1[-1] == "Average (image)" and len(table1) == 10
    mvtec_row = next(line for line in (reports / "table1.md").read_text().splitlines() if line.startswith("| MVTec"))
    float(mvtec_row.split("|")[-3].strip("* "))  # our number, not '-'
    for key in ("table2", "table5", "table6", "table7", "table8", "table9", "table10", "table11", "table12",
                "table13"):
        names = [run.name for run in experiment_runs(benchmark, profile, key)]
        rows = [row.split(" (paper:")[0] for row in _table_rows(reports / f"{key}.md")]
        assert rows == names, key
        assert (reports / f"{key}.tex").is_file()
    assert _table_rows(reports / "table14.md") == ["Expert 1", "Expert 2", "Expert 3", "Expert 4"]
    for figure in ("fig5_expert_similarity", "fig6_number_of_experts_k", "fig7_hyperparameter_sweeps",
                   "fig9_expert_utilisation"):
        assert (reports / f"{figure}.png").is_file()


def test_the_demo_reproduces_the_committed_lock_and_reports(clone):
    """What `make demo` then `git status` checks: nothing committed changes (every output is the same bytes)."""
    changed = _run(["git", "status", "--porcelain", "--untracked-files=no"], clone).stdout
    assert changed == "", f"the demo run changed committed files (run `make demo` and commit them):\n{changed}"
    committed, rendered = ROOT / "reports" / "demo", clone / "reports" / "demo"
    names = sorted(path.name for path in committed.iterdir())
    assert names == sorted(path.name for path in rendered.iterdir())
    _, mismatched, errors = filecmp.cmpfiles(committed, rendered, names, shallow=False)
    assert mismatched == errors == [], f"reports/demo differs from what the demo renders: {mismatched + errors}"


def test_second_repro_is_a_no_op(clone):
    second = _run(["dvc", "repro"], clone)
    assert "Running stage" not in second.stdout
    assert "up to date" in _run(["dvc", "status"], clone).stdout


def test_dvc_metrics_and_plots_work(clone):
    metrics = _run(["dvc", "metrics", "show", "--json"], clone).stdout
    assert "runs/demo/metrics/evaluate/visa/mvtec.json" in metrics and "pixel_auroc" in metrics
    table = _run(["dvc", "metrics", "show"], clone).stdout.splitlines()
    assert len(table) == 1 + 14 and max(map(len, table)) <= 120  # one row per main evaluation, readable
    _run(["dvc", "plots", "show", "-o", "plots"], clone)
    assert (clone / "plots" / "index.html").is_file()


def _status_after(clone: Path, path: Path, edited: str) -> set[str]:
    """The stages `dvc status` names once `path` holds `edited` and the stamps are written again (then undone)."""
    original = path.read_text()
    try:
        path.write_text(edited)
        assert _changed(_run(["dvc", "status"], clone).stdout) == {STAMP_STAGE}  # what an edit touches directly
        _run(["dvc", "repro", STAMP_STAGE], clone)  # the stamps say which calls' code or settings changed
        return _changed(_run(["dvc", "status"], clone).stdout)
    finally:
        path.write_text(original)
        _run(["dvc", "repro", STAMP_STAGE], clone)


def _changed(status: str) -> set[str]:
    return {line.rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))}


def _edited_params(clone: Path, edit) -> str:
    document = yaml.safe_load((clone / "params.yaml").read_text())
    edit(document)
    return yaml.safe_dump(document, sort_keys=False)


def test_a_params_edit_invalidates_only_what_depends_on_it(clone):
    def noise(document):
        document["experiments"]["table11"]["variants"]["0.4"]["model"]["router_noise"] = 0.5
    assert _status_after(clone, clone / "params.yaml", _edited_params(clone, noise)) == {"experiment@table11", "report"}


def test_a_method_setting_invalidates_that_methods_stages_and_no_others(clone):
    """MoECLIP's lambda_etf reaches its trainings, experiments and the report, no baseline; a baseline's focal
    gamma only its own stage."""
    benchmark, _ = load_plan(clone / "params.yaml")

    def moeclip(document):
        document["profiles"]["demo"]["model"]["lambda_etf"] = 0.02

    def april_gan(document):
        document["profiles"]["demo"]["methods"]["april_gan"]["model"]["focal_gamma"] = 3.0
    assert _status_after(clone, clone / "params.yaml", _edited_params(clone, moeclip)) == {
        *(f"train@{auxiliary}" for auxiliary in benchmark.main.targets),
        *(f"experiment@{key}" for key in benchmark.experiments), "report"}
    assert _status_after(clone, clone / "params.yaml", _edited_params(clone, april_gan)) == {"baseline@april_gan"}


def _stage_code(clone: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per locked call but the stamps stage: (the package files it recorded having run, the files its stamp
    lists, which is its one code and settings entry in dvc.lock)."""
    locked = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    runs = clone / "runs" / "demo"
    code = {}
    for name, stage in locked.items():
        if name == STAMP_STAGE:
            continue
        assert [dep["path"] for dep in stage["deps"] if dep["path"].startswith(("moeclip", "runs/demo/stamps"))] \
            == [f"runs/demo/stamps/{name}.json"] and "params" not in stage, name
        code[name] = (json.loads((runs / "usage" / f"{name}.json").read_text())["code"],
                      json.loads((runs / "stamps" / f"{name}.json").read_text())["code"]["files"])
    return code


def test_every_stage_ran_exactly_the_code_its_stamp_lists(clone):
    """What each stage process loaded (warm server, worker processes included) is what its code stamp lists."""
    for name, (recorded, declared) in _stage_code(clone).items():
        assert folded(recorded, clone) == declared, name


# Modules that only some stages import: the edit must invalidate those and no others.
EDITED_MODULES = ("moeclip/cost.py", "moeclip/data/synthetic.py", "moeclip/analysis.py",
                  "moeclip/bench/reports/tables.py", "moeclip/data/prepare.py")


@pytest.mark.parametrize("module", EDITED_MODULES)
def test_an_edit_to_a_module_invalidates_exactly_the_stages_that_import_it(clone, module):
    code = _stage_code(clone)
    importers = {name for name, (recorded, _) in code.items() if module in recorded}
    assert importers and importers != set(code)
    path = clone / module
    assert _status_after(clone, path, path.read_text() + "\n# an edit\n") == importers
