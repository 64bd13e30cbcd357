"""`moeclip plan`: the plan's units with an estimated time each, and how long they take on 1 to 32 GPUs.

The units are the ones the distributed flow runs (moeclip/bench/units.py): every split call's trainings and
(trained model, dataset) evaluations, and the single-unit calls (fetch, prepare, main trainings and
evaluations, analysis, report). A unit waits for its own call's units it reads and for every unit of the
calls that write what its call reads, as the flow submits them. Times come from moeclip/bench/schedule.py's
cost model: images through the model at the authors' release speed on one H100 (SPEC.md section 11),
scaled by patch tokens for other image sizes; a main training adds its calibration pass; fetch, prepare,
the gathering steps and the report are not costed (0 s: CPU work that needs no GPU).
"""
from __future__ import annotations

from importlib import import_module

from moeclip.bench.experiments import Benchmark, main_run
from moeclip.bench.params import Profile
from moeclip.bench.schedule import PlannedUnit, evaluation_seconds, training_seconds
from moeclip.bench.stages import STAGES, Stage, plan_calls, unit_name, waits_for
from moeclip.bench.units import SPLIT_STAGES, Workload
from moeclip.data.registry import get_dataset



def seconds(workload: Workload | None) -> float:
    """A workload's estimated time on one H100 at the release's speed."""
    if workload is None:
        return 0.0
    if workload.epochs:
        return training_seconds(workload.images, workload.epochs, workload.image_size)
    return evaluation_seconds(workload.images, workload.image_size)


def _single_unit_workloads(stage: Stage, benchmark: Benchmark, profile: Profile,
                           args: dict[str, str]) -> list[Workload]:
    """What a single-unit call runs through its model: a main training and its calibration pass, or a main
    evaluation, or the analyses' passes over their datasets."""
    size = profile.model.image_size
    if stage.name == "train":
        run = main_run(profile, args["auxiliary"])
        images = sum(get_dataset(name).train_images for name in run.train_on)
        return [Workload(images, size, run.train.epochs), Workload(images, size)]
    if stage.name == "evaluate":
        return [Workload(get_dataset(args["target"]).test_images, size)]
    if stage.name == "analysis":
        analysed = {profile.analysis.statistics_dataset, profile.analysis.similarity_dataset}
        return [Workload(get_dataset(name).test_images, size) for name in sorted(analysed)]
    return []


def planned_units(benchmark: Benchmark, profile: Profile) -> list[PlannedUnit]:
    """Every unit of the profile's full plan, in submission order, with its estimated seconds."""
    calls = [(STAGES[0].name, {})] + [(stage.name, args) for stage, args in plan_calls(benchmark)]
    waits = waits_for(calls, benchmark, profile.layout)
    ends: dict[str, tuple[str, ...]] = {}  # each call's last unit
    planned: list[PlannedUnit] = []
    for name, args in calls:
        stage = next(stage for stage in STAGES if stage.name == name)
        label = stage.label(args)
        before = tuple(unit for other in waits[label] for unit in ends[other])
        if name in SPLIT_STAGES:
            units = import_module(stage.module).units(benchmark, profile, *args.values())
            planned += [PlannedUnit(unit.name, unit.gpu, seconds(unit.workload), before + unit.after)
                        for unit in units]
            planned.append(PlannedUnit(label, False, 0.0, before + tuple(unit.name for unit in units)))
            ends[label] = (label,)
        else:
            workloads = _single_unit_workloads(stage, benchmark, profile, args)
            planned.append(PlannedUnit(unit_name(stage, args), bool(workloads),
                                       sum(seconds(workload) for workload in workloads), before))
            ends[label] = (planned[-1].name,)
    return planned
