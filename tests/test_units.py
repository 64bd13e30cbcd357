"""Units of work: how a stage call splits into trainings and (model, dataset) evaluations, how they run, and what
the planner makes of the paper plan."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moeclip.bench.experiments import load_plan
from moeclip.bench.params import RuntimeConfig
from moeclip.bench.planning import planned_units
from moeclip.bench.schedule import critical_path, evaluation_seconds, simulate, training_seconds
from moeclip.bench.stages import baseline, experiment
from moeclip.bench.units import Unit, Workload, check_units, run_units

ROOT = Path(__file__).resolve().parents[1]
ORDER: list[str] = []


def _record(name: str) -> str:
    ORDER.append(name)
    return name.upper()


def test_units_are_checked_and_run_in_waves_of_ready_units():
    with pytest.raises(ValueError, match="two units are named 'a'"):
        check_units([Unit("a", False, _record, ("a",)), Unit("a", False, _record, ("a",))])
    with pytest.raises(ValueError, match=r"unit 'b' waits for \['c'\], which no earlier unit is"):
        check_units([Unit("b", False, _record, ("b",), ("c",)), Unit("c", False, _record, ("c",))])
    ORDER.clear()
    units = [Unit("a", False, _record, ("a",)), Unit("b", False, _record, ("b",), ("a",)),
             Unit("c", False, _record, ("c",))]
    assert run_units(units, RuntimeConfig(workers=1, measure_time=False)) == {"a": "A", "c": "C", "b": "B"}
    assert ORDER == ["a", "c", "b"]  # c does not wait for b: it is ready in the first wave


def _demo():
    return load_plan(ROOT / "params.yaml", "demo")


def test_an_experiment_trains_each_own_variant_once_and_evaluates_it_per_dataset():
    benchmark, profile = _demo()
    units = {unit.name: unit for unit in experiment.units(benchmark, profile, "table2")}
    variants = ("w/o FOFS", "w/o ETF Loss", "w/o PAA")
    assert [name for name in units if not name.startswith("evaluate/")] == \
        ["build/table2/Vanilla CLIP", *(f"train/table2/{v}" for v in variants)]
    assert not units["build/table2/Vanilla CLIP"].gpu and all(units[f"train/table2/{v}"].gpu for v in variants)
    # The default row is a main training evaluated as the main results were: no unit at all.
    assert {name for name in units if name.startswith("evaluate/")} == {
        f"evaluate/table2/{variant}/{dataset}" for variant in ("Vanilla CLIP", *variants)
        for dataset in ("mvtec", "dtd", "headct", "colondb")}
    evaluation = units["evaluate/table2/w/o PAA/headct"]
    assert evaluation.after == ("train/table2/w/o PAA",)
    assert evaluation.workload == Workload(200, 64)  # Head CT's 200 published test images at the demo's 64 px
    assert units["train/table2/w/o PAA"].workload == Workload(2162, 64, 3)  # VisA, 3 epochs
    # Router noise acts at test time: the noisy variants reuse the main training (no training unit).
    noisy = experiment.units(benchmark, profile, "table11")
    assert [(unit.name, unit.after) for unit in noisy] == [("evaluate/table11/0.4/mvtec", ()),
                                                          ("evaluate/table11/1.0/mvtec", ())]
    assert noisy[0].args[2] == profile.layout.checkpoint("visa")
    cost = [unit.name for unit in experiment.units(benchmark, profile, "table13") if unit.name.startswith("cost/")]
    assert cost == ["cost/table13/Single expert (K=1)", "cost/table13/MoECLIP"]  # cost is measured, not reused


def test_variants_that_are_the_same_training_share_one_training_unit(tmp_path):
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    document["experiments"]["table6"]["variants"]["Learnable again"] = {"model": {"learnable_prompts": True}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    benchmark, profile = load_plan(path, "demo")
    units = {unit.name: unit for unit in experiment.units(benchmark, profile, "table6")}
    assert [name for name in units if name.startswith("train/")] == ["train/table6/MoECLIP (Learnable)"]
    again, first = units["evaluate/table6/Learnable again/mvtec"], units["evaluate/table6/MoECLIP (Learnable)/mvtec"]
    assert again.after == first.after == ("train/table6/MoECLIP (Learnable)",)
    assert again.args[2] == first.args[2]  # the same checkpoint


def test_a_baseline_trains_per_auxiliary_and_evaluates_per_target():
    benchmark, profile = _demo()
    winclip = [unit.name for unit in baseline.units(benchmark, profile, "winclip")]
    assert winclip[:2] == ["build/winclip/visa", "build/winclip/mvtec"]  # training-free: built, no GPU asked
    assert len(winclip) == 2 + 13 + 1 and "evaluate/winclip/mvtec/visa" in winclip and "evaluate/winclip/visa/kvasir" in winclip
    april = baseline.units(benchmark, profile, "april_gan")
    assert april[0].name == "train/april_gan/visa" and april[0].gpu and april[0].workload.epochs == 1
    assert all(unit.after == ("train/april_gan/visa",) for unit in april if unit.name.startswith("evaluate/april_gan/visa/"))
    # AA-CLIP trains in two stages (1 text epoch, then the image stage's 1 in the demo): both are costed.
    assert baseline.units(benchmark, profile, "aa_clip")[0].workload == Workload(2162, 64, 2)


def test_the_paper_plan_is_costed_from_the_release_speed_and_scheduled():
    benchmark, profile = load_plan(ROOT / "params.yaml", "paper")
    planned = planned_units(benchmark, profile)
    names = [unit.name for unit in planned]
    assert len(names) == len(set(names))
    assert all(name in names[:index] for index, unit in enumerate(planned) for name in unit.after)
    by_name = {unit.name: unit for unit in planned}
    # A main training: 20 epochs over VisA's 2,162 images, then its calibration pass over them, at 518 px.
    assert by_name["train/visa"].seconds == pytest.approx(training_seconds(2162, 20, 518) + evaluation_seconds(2162, 518))
    assert by_name["evaluate/visa/mvtec"].seconds == pytest.approx(evaluation_seconds(1725, 518))
    assert set(by_name["evaluate/visa/mvtec"].after) == {"stamps", "prepare/mvtec", "train/visa"}  # its stamp too
    assert by_name["experiment@table9"].seconds == 0 and not by_name["experiment@table9"].gpu
    chain, _ = critical_path(planned)
    assert chain[0] == "stamps" and chain[-1] == "report"
    one, eight = simulate(planned, 1), simulate(planned, 8)
    assert one.gpu_hours == eight.gpu_hours and eight.makespan_s < one.makespan_s / 4
