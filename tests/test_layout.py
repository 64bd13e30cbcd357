"""One object for every path of a profile (moeclip/bench/layout.py), and dvc.yaml naming the same paths."""
from pathlib import Path

import yaml

from moeclip.bench.experiments import load_plan
from moeclip.bench.layout import RunLayout, checkpoint_in
from moeclip.bench.stages import get_stage

ROOT = Path(__file__).resolve().parents[1]


def _data_paths(stage: dict) -> tuple[set[str], set[str]]:
    """A locked stage's outputs and dependencies (its code is one of them: its stamp, or the package for the
    code stage)."""
    return {out["path"] for out in stage.get("outs", [])}, {dep["path"] for dep in stage["deps"]}


def test_dvc_stages_read_and_write_the_layouts_paths():
    """dvc.lock holds the stages as DVC expanded them for the committed (demo) profile."""
    benchmark, profile = load_plan(ROOT / "params.yaml")
    layout = profile.layout
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    expected: dict[str, tuple[set[Path], set[Path]]] = {}
    expected["stamps"] = ({layout.stamps()}, {Path("moeclip"), Path("params.yaml")})  # every setting, as a file
    for dataset in benchmark.datasets:
        expected[f"fetch@{dataset}"] = ({layout.raw(dataset)}, set())
        expected[f"prepare@{dataset}"] = ({layout.manifest(dataset)}, {layout.raw(dataset)})
    for auxiliary, targets in benchmark.main.targets.items():
        expected[f"train@{auxiliary}"] = ({layout.training(auxiliary)}, {layout.manifest(auxiliary)})
        for target in targets:
            expected[f"evaluate-{auxiliary}@{target}"] = (
                {layout.evaluation(auxiliary, target), layout.evaluation_metrics(auxiliary, target)},
                {layout.training(auxiliary), layout.manifest(target)})
    for experiment in benchmark.experiments:
        expected[f"experiment@{experiment}"] = (
            {layout.experiment(experiment), layout.experiment_metrics(experiment),
             layout.experiment_resources(experiment)},
            {layout.manifests(), layout.main_metrics(), layout.trainings()})
    for method in benchmark.methods:
        expected[f"baseline@{method}"] = (
            {layout.baseline(method), layout.baseline_metrics(method), layout.baseline_resources(method)},
            {layout.manifests()})
    expected["analysis"] = ({layout.analysis()}, {layout.manifests(), layout.training(benchmark.main.auxiliary)})
    expected["report"] = ({layout.reports}, {layout.metrics(), layout.resources(), layout.analysis()})
    for name, (_, deps) in expected.items():  # every call but the stamps stage's also reads its stamp
        if name != "stamps":
            deps.add(layout.stamp(name))
    assert set(locked) == set(expected)
    for name, (outs, deps) in expected.items():
        assert _data_paths(locked[name]) == ({p.as_posix() for p in outs}, {p.as_posix() for p in deps}), name


def test_the_trainings_checkpoint_and_loss_curve_are_where_dvc_plots_looks():
    layout = RunLayout(data=Path("data/demo"), runs=Path("runs/demo"), reports=Path("reports/demo"))
    assert layout.checkpoint("visa") == checkpoint_in(layout.training("visa"))
    assert layout.checkpoint("visa") == Path("runs/demo/train/visa/checkpoint.pt")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    curves = [path.replace("${profile}", "demo").replace("${main.auxiliary}", "visa") for entry in plots
              if isinstance(entry, dict) and "training loss" in entry for path in entry["training loss"]["y"]]
    assert curves == [layout.losses("visa").as_posix()]


def test_a_profiles_data_root_moves_only_its_data():
    _, profile = load_plan(ROOT / "params.yaml", "release")
    assert profile.layout.data == Path("data/paper")
    assert profile.layout.runs == Path("runs/release") and profile.layout.reports == Path("reports/release")


def _stage_call(name: str) -> tuple[str, dict[str, str]]:
    """A DVC stage name as (declared stage, arguments): 'evaluate-visa@mvtec' -> ('evaluate', {...})."""
    kind, _, item = name.partition("@")
    if kind.startswith("evaluate-"):
        return "evaluate", {"auxiliary": kind.removeprefix("evaluate-"), "target": item}
    stage = get_stage(kind)
    return kind, dict(zip(stage.arguments, [item] if item else []))


def test_the_declared_stages_read_and_write_what_dvc_ran():
    """The declarations, with the committed profile's layout, name exactly the data paths of dvc.lock."""
    benchmark, profile = load_plan(ROOT / "params.yaml")
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    for name, stage in locked.items():
        outs, deps = _data_paths(stage)
        kind, args = _stage_call(name)
        reads, writes = get_stage(kind).paths(profile.layout, benchmark, args)
        assert get_stage(kind).label(args) == name
        assert ({path.as_posix() for path in writes}, {path.as_posix() for path in reads}) == (outs, deps), name
