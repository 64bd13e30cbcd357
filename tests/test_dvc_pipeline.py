"""End to end: the demo profile through `dvc repro` in a temporary clone of the working tree.

One module-scoped run (several minutes on 2 CPU cores) serves every check: all tables with all
rows, metrics and plots through DVC's own commands, a second `dvc repro` doing nothing, and
`dvc status` naming exactly the stages a params edit affects.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeclip.experiments import experiment_runs, load_plan

# The module fixture's `dvc repro` counts against the first test's timeout: about 14 minutes on
# an idle 2-core machine, more beside the other pytest worker.
pytestmark = pytest.mark.timeout(2700)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(cwd), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The working tree's tracked and new files in a fresh git repository, after a full `dvc repro`."""
    clone = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith("reports/"):  # the run must regenerate the reports
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    (clone / "dvc.lock").unlink(missing_ok=True)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(command, cwd=clone, check=True, capture_output=True)
    _run(["dvc", "repro"], clone)
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
    for figure in ("fig5_expert_similarity", "fig6_num_experts", "fig7_hyperparameters", "fig9_expert_utilisation"):
        assert (reports / f"{figure}.png").is_file()


def test_second_repro_is_a_no_op(clone):
    second = _run(["dvc", "repro"], clone)
    assert "Running stage" not in second.stdout
    assert "up to date" in _run(["dvc", "status"], clone).stdout


def test_dvc_metrics_and_plots_work(clone):
    metrics = _run(["dvc", "metrics", "show", "--json"], clone).stdout
    assert "runs/demo/metrics/evaluate/visa/mvtec.json" in metrics and "pixel_auroc" in metrics
    _run(["dvc", "plots", "show", "-o", "plots"], clone)
    assert (clone / "plots" / "index.html").is_file()


def test_a_params_edit_invalidates_only_what_depends_on_it(clone):
    params = clone / "params.yaml"
    original = params.read_text()
    try:
        document = yaml.safe_load(original)
        document["experiments"]["table11"]["variants"]["0.4"]["model"]["router_noise"] = 0.5
        params.write_text(yaml.safe_dump(document, sort_keys=False))
        status = _run(["dvc", "status"], clone).stdout
    finally:
        params.write_text(original)
    changed = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))}
    assert changed == {"experiment@table11", "report"}, status
