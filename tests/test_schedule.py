"""Planning by simulation (moeclip/bench/schedule.py): schedules worked out by hand, the refusals, the cost
model on SPEC.md section 11's numbers, and the registry's image counts behind it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from moeclip.bench.schedule import (
    PlannedUnit,
    critical_path,
    evaluation_seconds,
    format_table,
    patch_tokens,
    simulate,
    training_seconds,
)
from moeclip.data.registry import DATASETS

ROOT = Path(__file__).resolve().parents[1]


def gpu(name: str, seconds: float, *after: str) -> PlannedUnit:
    return PlannedUnit(name, True, seconds, after)


def cpu(name: str, seconds: float, *after: str) -> PlannedUnit:
    return PlannedUnit(name, False, seconds, after)


def spans(schedule) -> dict[str, tuple[float, float]]:
    return {name: (slot.start_s, slot.end_s) for name, slot in schedule.slots.items()}


# --- simulate ---------------------------------------------------------------------------------------------


def test_a_chain_runs_one_unit_after_the_other_whatever_the_gpus():
    units = [cpu("fetch", 1), gpu("train", 2, "fetch"), cpu("report", 3, "train")]
    for gpus in (1, 4):
        schedule = simulate(units, gpus)
        assert spans(schedule) == {"fetch": (0, 1), "train": (1, 3), "report": (3, 6)}
        assert schedule.makespan_s == 6
        assert schedule.gpu_hours == pytest.approx(2 / 3600)
        assert schedule.utilisation == pytest.approx(2 / (gpus * 6))


def test_a_diamond_shares_one_gpu_and_spreads_over_two():
    units = [cpu("a", 1), gpu("b", 4, "a"), gpu("c", 2, "a"), cpu("d", 1, "b", "c")]
    one, two = simulate(units, 1), simulate(units, 2)
    assert spans(one) == {"a": (0, 1), "b": (1, 5), "c": (5, 7), "d": (7, 8)}
    assert spans(two) == {"a": (0, 1), "b": (1, 5), "c": (1, 3), "d": (5, 6)}
    assert (one.makespan_s, two.makespan_s) == (8, 6)
    assert (one.slots["b"].gpu, one.slots["c"].gpu, two.slots["b"].gpu, two.slots["c"].gpu) == (0, 0, 0, 1)
    assert one.slots["a"].gpu is None and one.slots["d"].gpu is None
    assert one.utilisation == pytest.approx(6 / 8) and two.utilisation == pytest.approx(6 / 12)


@pytest.mark.parametrize("gpus, makespan, utilisation", [(1, 30, 1.0), (2, 20, 0.75), (3, 10, 1.0), (5, 10, 0.6)])
def test_three_equal_gpu_units_take_3x_2x_1x_on_1_2_3_gpus(gpus, makespan, utilisation):
    schedule = simulate([gpu("u1", 10), gpu("u2", 10), gpu("u3", 10)], gpus)
    assert schedule.makespan_s == makespan
    assert schedule.gpu_hours == pytest.approx(30 / 3600)
    assert schedule.utilisation == pytest.approx(utilisation)


def test_cpu_units_take_no_gpu_and_never_wait_for_one():
    units = [cpu("c1", 5), gpu("g1", 10), cpu("c2", 7), gpu("g2", 10), cpu("c3", 3, "c1")]
    schedule = simulate(units, 1)
    assert spans(schedule) == {"c1": (0, 5), "g1": (0, 10), "c2": (0, 7), "g2": (10, 20), "c3": (5, 8)}
    assert schedule.gpu_hours == pytest.approx(20 / 3600) and schedule.utilisation == 1.0
    only_cpu = simulate([cpu("x", 4), cpu("y", 4), cpu("z", 4)], 1)  # all at once: enough CPUs
    assert only_cpu.makespan_s == 4 and only_cpu.gpu_hours == 0 and only_cpu.utilisation == 0


def test_a_free_gpu_takes_the_earliest_submitted_ready_unit():
    assert spans(simulate([gpu("long", 5), gpu("short", 1)], 1)) == {"long": (0, 5), "short": (5, 6)}
    assert spans(simulate([gpu("short", 1), gpu("long", 5)], 1)) == {"short": (0, 1), "long": (1, 6)}
    # Ready at the same instant through the same gate: submission order, not the order of `after`.
    units = [cpu("gate", 2), gpu("x", 3, "gate"), gpu("y", 1, "gate"), gpu("z", 1)]
    assert spans(simulate(units, 1)) == {"gate": (0, 2), "z": (0, 1), "x": (2, 5), "y": (5, 6)}
    # Units released at once by a zero-second unit compete with those already ready.
    units = [cpu("gate", 0), gpu("first", 1, "gate"), gpu("second", 1)]
    assert spans(simulate(units, 1)) == {"gate": (0, 0), "first": (0, 1), "second": (1, 2)}


def test_a_free_gpu_does_not_wait_for_an_earlier_submitted_unit_not_yet_ready():
    units = [cpu("prepare", 1), gpu("early", 5, "prepare"), gpu("late", 5)]
    assert spans(simulate(units, 1)) == {"prepare": (0, 1), "late": (0, 5), "early": (5, 10)}


def test_the_lowest_numbered_free_gpu_is_used_and_freed_gpus_are_reused():
    schedule = simulate([gpu("a", 3), gpu("b", 1), gpu("c", 1), gpu("d", 1)], 2)
    assert {name: slot.gpu for name, slot in schedule.slots.items()} == {"a": 0, "b": 1, "c": 1, "d": 1}
    assert spans(schedule) == {"a": (0, 3), "b": (0, 1), "c": (1, 2), "d": (2, 3)}


def test_an_empty_plan_takes_no_time():
    schedule = simulate([], 4)
    assert (dict(schedule.slots), schedule.makespan_s, schedule.gpu_hours, schedule.utilisation) == ({}, 0, 0, 0)
    assert critical_path([]) == ([], 0.0)


def test_the_schedule_lists_every_unit_in_plan_order_even_when_a_unit_waits_for_a_later_one():
    units = [gpu("evaluate", 2, "train"), gpu("train", 3), cpu("report", 1, "evaluate")]
    schedule = simulate(units, 2)
    assert list(schedule.slots) == ["evaluate", "train", "report"]
    assert schedule.start("evaluate") == 3 and schedule.end("report") == 6 and schedule.makespan_h == 6 / 3600


# --- critical_path ----------------------------------------------------------------------------------------


def test_the_critical_path_is_the_longest_chain_by_seconds():
    diamond = [cpu("a", 1), gpu("b", 4, "a"), gpu("c", 2, "a"), cpu("d", 1, "b", "c")]
    assert critical_path(diamond) == (["a", "b", "d"], 6)
    assert critical_path([gpu("x", 3), gpu("y", 5), cpu("z", 1, "x")]) == (["y"], 5)
    # Equally long chains: the earliest-planned units.
    assert critical_path([gpu("p", 2), gpu("q", 2), cpu("r", 1, "q", "p")]) == (["p", "r"], 3)
    # Zero-second units stay on the chain they end (a report after the last evaluation).
    assert critical_path([gpu("a", 2), cpu("b", 0, "a"), gpu("c", 2)]) == (["a", "b"], 2)


def test_enough_gpus_reach_the_critical_path_and_none_beat_it():
    units = [cpu("fetch", 60), *(gpu(f"train{i}", 1000 + 100 * i, "fetch") for i in range(3)),
             *(gpu(f"eval{i}-{j}", 50, f"train{i}") for i in range(3) for j in range(4)),
             cpu("report", 10, *(f"eval{i}-{j}" for i in range(3) for j in range(4)))]
    chain, length = critical_path(units)
    assert chain == ["fetch", "train2", "eval2-0", "report"] and length == 60 + 1200 + 50 + 10
    makespans = [simulate(units, gpus).makespan_s for gpus in (1, 2, 4, 8, 16)]
    assert all(makespan >= length for makespan in makespans) and makespans[-1] == length
    assert makespans == sorted(makespans, reverse=True)


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("units, message", [
    ([gpu("a", 1), gpu("b", 1, "a", "ghost")], "unit 'b' waits for 'ghost', which is not a planned unit"),
    ([gpu("a", 1, "c"), gpu("b", 1, "a"), gpu("c", 1, "b"), gpu("d", 1, "a")],
     "units wait for each other in a cycle: a -> c -> b -> a"),
    ([gpu("a", 1), cpu("b", 1, "b")], "units wait for each other in a cycle: b -> b"),
    ([gpu("a", 1), cpu("a", 2)], "unit 'a' is planned twice"),
])
def test_unknown_units_cycles_and_twice_planned_units_are_refused(units, message):
    for call in (lambda: simulate(units, 2), lambda: critical_path(units), lambda: format_table(units, (1,))):
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == message and "\n" not in message


@pytest.mark.parametrize("gpus", [0, -1, 1.5, True])
def test_fewer_than_one_gpu_is_refused(gpus):
    with pytest.raises(ValueError, match=r"^gpus must be a whole number of at least 1, got .+$"):
        simulate([gpu("a", 1)], gpus)


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_a_unit_needs_a_finite_non_negative_duration(seconds):
    with pytest.raises(ValueError, match="seconds must be finite and at least 0"):
        gpu("a", seconds)


def test_after_may_be_given_as_a_list_and_the_unit_stays_hashable():
    unit = PlannedUnit("a", True, 1.0, ["b", "c"])  # type: ignore[arg-type]
    assert unit.after == ("b", "c") and hash(unit) == hash(PlannedUnit("a", True, 1.0, ("b", "c")))


# --- cost model -------------------------------------------------------------------------------------------


def test_the_cost_model_reproduces_the_releases_h100_speeds_at_518_px():
    # SPEC.md section 11: 11.8 training images/s at batch 2, 31 inference images/s, fp32, one H100.
    visa = DATASETS["visa"].train_images
    assert visa * 20 == 43_240
    assert training_seconds(visa, 20, 518) == pytest.approx(43_240 / 11.8)
    assert training_seconds(43_240, 1, 518) == pytest.approx(43_240 / 11.8)
    assert evaluation_seconds(31, 518) == pytest.approx(1.0)
    assert evaluation_seconds(DATASETS["mvtec"].test_images, 518) == pytest.approx(1725 / 31)
    assert training_seconds(100, 2, 518, images_per_s=50.0) == pytest.approx(4.0)  # a measured throughput
    assert evaluation_seconds(350, 518, images_per_s=350.0) == pytest.approx(1.0)
    assert training_seconds(0, 20, 518) == 0 and training_seconds(10, 0, 518) == 0


def test_other_image_sizes_scale_with_the_patch_tokens():
    assert patch_tokens(518) == 37 ** 2 and patch_tokens(336) == 24 ** 2 and patch_tokens(530) == 37 ** 2
    assert training_seconds(1000, 1, 602) == pytest.approx(1000 / 11.8 * 43 ** 2 / 37 ** 2)
    assert evaluation_seconds(1000, 448) == pytest.approx(1000 / 31 * 32 ** 2 / 37 ** 2)
    assert evaluation_seconds(1000, 448, patch=32) == pytest.approx(1000 / 31 * 14 ** 2 / 37 ** 2)  # ViT-B/32
    with pytest.raises(ValueError, match="holds no 14 px patch"):
        evaluation_seconds(10, 13)


@pytest.mark.parametrize("call", [
    lambda: training_seconds(-1, 20, 518), lambda: training_seconds(10, -1, 518),
    lambda: training_seconds(10, 20, 518, images_per_s=0.0), lambda: evaluation_seconds(1.5, 518),  # type: ignore[arg-type]
    lambda: evaluation_seconds(10, 518, images_per_s=-3.0),
])
def test_the_cost_model_refuses_negative_counts_and_throughputs(call):
    with pytest.raises(ValueError):
        call()


# --- the registry's image counts --------------------------------------------------------------------------


def _paper_epochs() -> int:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["paper"]["train"]["epochs"]


def test_the_two_main_trainings_read_77740_images_and_table_3_counts_14127_test_images():
    """docs/performance.md: 2 trainings of 20 epochs (on VisA and on MVTec-AD) are 77,740 training images,
    and the 14 evaluations 14,127 test images by the paper's Table 3."""
    main = yaml.safe_load((ROOT / "params.yaml").read_text())["main"]["targets"]
    trained = [name for name, targets in main.items() if targets]  # brainmri's training is Table 12's
    assert trained == ["visa", "mvtec"] and _paper_epochs() == 20
    assert _paper_epochs() * sum(DATASETS[name].train_images for name in trained) == 77_740
    assert len(DATASETS) == 14
    assert sum(spec.expected_normal + spec.expected_anomalous for spec in DATASETS.values()) == 14_127


def test_the_released_test_sets_differ_from_table_3_only_where_the_count_note_says_so():
    """The release holds 357 DTD-Synthetic normal images (Table 3: 375) and 3,075 Brain MRI anomalous ones
    (Table 3: 1,013): the 14 evaluations read 14,127 - 18 + 2,062 = 16,171 images."""
    differences = {name: spec.test_images - spec.expected_normal - spec.expected_anomalous
                   for name, spec in DATASETS.items()
                   if spec.test_images != spec.expected_normal + spec.expected_anomalous}
    assert differences == {"dtd": 357 - 375, "brainmri": 3075 - 1013}
    assert all(DATASETS[name].count_note for name in differences)
    assert sum(spec.test_images for spec in DATASETS.values()) == 16_171
    # The protocol trains on the auxiliary dataset's test split (SPEC.md section 7).
    assert all(spec.train_images == spec.test_images for spec in DATASETS.values())
    assert DATASETS["brainmri"].train_images * _paper_epochs() == 74_300  # Table 12's training


def test_a_declaration_whose_test_images_differ_from_table_3_must_say_why():
    spec = DATASETS["headct"]
    with pytest.raises(ValueError, match="differs from Table 3's 100 \\+ 100 without a count_note"):
        replace(spec, test_images=201)
    assert replace(spec, test_images=201, count_note="the release has one more").test_images == 201
    with pytest.raises(ValueError, match="must be at least 1"):
        replace(spec, train_images=0)


def test_the_paper_profile_on_one_gpu_takes_what_docs_performance_md_estimates():
    """Two trainings and 14 evaluations at the release's speed: about 118 minutes on one H100 with Table 3's
    counts (docs/performance.md); the released Brain MRI and DTD sets add 2,044 test images."""
    epochs = _paper_epochs()
    table3 = {name: spec.expected_normal + spec.expected_anomalous for name, spec in DATASETS.items()}
    main = yaml.safe_load((ROOT / "params.yaml").read_text())["main"]["targets"]

    def plan(counts: dict[str, int]) -> list[PlannedUnit]:
        units = [cpu(f"prepare@{name}", 0) for name in DATASETS]
        units += [gpu(f"train@{aux}", training_seconds(counts[aux], epochs, 518), f"prepare@{aux}")
                  for aux, targets in main.items() if targets]
        units += [gpu(f"evaluate-{aux}@{target}", evaluation_seconds(counts[target], 518), f"train@{aux}",
                      f"prepare@{target}") for aux, targets in main.items() for target in targets]
        return units + [cpu("report", 0, *(unit.name for unit in units if unit.gpu))]

    one = simulate(plan(table3), 1)
    assert one.makespan_s == pytest.approx(77_740 / 11.8 + 14_127 / 31)
    assert round(one.makespan_s / 60) == 117 and one.utilisation == pytest.approx(1.0)
    released = simulate(plan({name: spec.test_images for name, spec in DATASETS.items()}), 1)
    assert released.makespan_s == pytest.approx(77_740 / 11.8 + 16_171 / 31)
    # Two GPUs: the trainings run side by side; VisA's (43,240 images) and its evaluations are the long branch.
    two = simulate(plan(table3), 2)
    chain, length = critical_path(plan(table3))
    assert chain[:2] == ["prepare@visa", "train@visa"] and chain[-1] == "report"
    assert two.makespan_s >= length and two.makespan_s < one.makespan_s


# --- format_table -----------------------------------------------------------------------------------------


def test_the_table_gives_makespan_gpu_hours_utilisation_speedup_and_the_critical_path():
    units = [cpu("fetch", 0), gpu("u1", 3600, "fetch"), gpu("u2", 3600, "fetch"), gpu("u3", 3600, "fetch"),
             cpu("report", 360, "u1", "u2", "u3")]
    assert format_table(units, (1, 2, 3, 4)) == (
        "| GPUs | makespan (h) | GPU-hours | utilisation | speed-up vs 1 GPU |\n"
        "|---:|---:|---:|---:|---:|\n"
        "| 1 | 3.10 | 3.00 | 97% | 1.00x |\n"
        "| 2 | 2.10 | 3.00 | 71% | 1.48x |\n"
        "| 3 | 1.10 | 3.00 | 91% | 2.82x |\n"
        "| 4 | 1.10 | 3.00 | 68% | 2.82x |\n"
        "\n"
        "Critical path: 1.10 h over 3 units (fetch -> u1 -> report), the least makespan on any number of GPUs.\n"
    )
    default = format_table(units)
    assert [line.split(" | ")[0] for line in default.splitlines()[2:8]] == [f"| {n}" for n in (1, 2, 4, 8, 16, 32)]
    with pytest.raises(ValueError, match="at least one GPU count"):
        format_table(units, ())
    with pytest.raises(ValueError, match="gpus must be"):
        format_table(units, (1, 0))
