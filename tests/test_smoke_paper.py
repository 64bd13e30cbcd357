"""The paper smoke run (benchmarks/smoke_paper.py, profile `paper-smoke`): the paper's real sizes, bounded work.

The CI-sized subset runs the real stage commands with the paper's ViT-L-14-336 at 518 px (random
weights): the main VisA training (one step of batch 1) and two evaluations, one industrial
(MVTec-AD) and one medical (Head CT). About 2.5 minutes on 2 cores (train about 30 s, each evaluation 15-35 s).
"""
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from benchmarks.bench_pipeline import stage_environment, wait_for_server
from benchmarks.smoke_paper import (PROFILE, baseline_records, planned_stages, stage_records, use_profile,
                                    variant_records)
from moeclip.bench.experiments import experiment_runs, load_plan
from moeclip.resources import USAGE_LINE

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_profile_is_the_paper_with_random_weights_small_trees_and_one_step():
    benchmark, paper = load_plan(ROOT / "params.yaml", "paper")
    _, smoke = load_plan(ROOT / "params.yaml", PROFILE)
    model_changes = {k for k, v in smoke.model.model_dump().items() if paper.model.model_dump()[k] != v}
    train_changes = {k for k, v in smoke.train.model_dump().items() if paper.train.model_dump()[k] != v}
    assert model_changes == {"weights"} and smoke.model.weights is None
    assert train_changes == {"batch_size", "max_steps"} and (smoke.train.batch_size, smoke.train.max_steps) == (1, 1)
    assert (smoke.data.synthetic, smoke.data.classes, smoke.data.per_class, smoke.data.real_sizes) == (True, 1, 1, True)
    assert smoke.runtime.measure_time and smoke.experiments == paper.experiments == {}
    for experiment in benchmark.experiments:  # every variant of the paper, none reduced
        assert [r.name for r in experiment_runs(benchmark, smoke, experiment)] == \
               [r.name for r in experiment_runs(benchmark, paper, experiment)]


def test_the_planned_stages_are_the_ones_dvc_expands():
    benchmark, profile = load_plan(ROOT / "params.yaml")
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert sorted(planned_stages(benchmark, profile)) == sorted(locked)


def test_use_profile_sets_the_profile_line_and_refuses_a_file_without_one(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# profile: x\nprofile: demo\ndatasets: [a]\n")
    use_profile(params, PROFILE)
    assert params.read_text() == f"# profile: x\nprofile: {PROFILE}\ndatasets: [a]\n"
    params.write_text("datasets: [a]\n")
    with pytest.raises(SystemExit, match="no top-level 'profile:' line"):
        use_profile(params, PROFILE)


def test_missing_stage_and_variant_records_are_named(tmp_path):
    benchmark, profile = load_plan(ROOT / "params.yaml", PROFILE)
    for stage in planned_stages(benchmark, profile)[1:]:  # the first stage left no record
        (tmp_path / profile.layout.usage(stage)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / profile.layout.usage(stage)).write_text(json.dumps({"seconds": 1.0, "peak_rss_gib": 2.0}))
    for experiment in benchmark.experiments:
        records = {run.name: {"params_m": 433.6, "seconds": 3.0, "peak_rss_gib": 9.0}
                   for run in experiment_runs(benchmark, profile, experiment)}
        if experiment == "table10":
            records["MLP Router"]["seconds"] = None  # measured without time
        (tmp_path / profile.layout.experiment_resources(experiment)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / profile.layout.experiment_resources(experiment)).write_text(json.dumps(records))
    for method in list(benchmark.methods)[1:]:  # the first baseline left no parameter counts
        (tmp_path / profile.layout.baseline_resources(method)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / profile.layout.baseline_resources(method)).write_text(json.dumps({"params_m": 429.0}))
    stages, missing_stages = stage_records(tmp_path, benchmark, profile)
    variants, missing_variants = variant_records(tmp_path, benchmark, profile)
    baselines, missing_baselines = baseline_records(tmp_path, benchmark, profile)
    assert missing_baselines == ["baseline winclip"] and list(baselines["method"]) == list(benchmark.methods)[1:]
    first = planned_stages(benchmark, profile)[0]
    assert missing_stages == [f"stage {first}"] and len(stages) == len(planned_stages(benchmark, profile)) - 1
    assert missing_variants == ["variant table10/MLP Router"]
    assert len(variants) == sum(len(experiment_runs(benchmark, profile, e)) for e in benchmark.experiments)


SUBSET = [["fetch", "visa"], ["fetch", "mvtec"], ["fetch", "headct"], ["prepare", "visa"], ["prepare", "mvtec"],
          ["prepare", "headct"], ["train", "visa"], ["evaluate", "visa", "mvtec"], ["evaluate", "visa", "headct"]]


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> tuple[Path, dict[str, tuple[float, float]]]:
    """The CI-sized subset as real `moeclip stage` commands; each stage's printed (seconds, peak RSS GiB)."""
    folder = tmp_path_factory.mktemp("smoke") / "work"
    folder.mkdir()
    (folder / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {**stage_environment(folder), "PYTHONPATH": str(ROOT)}
    printed: dict[str, tuple[float, float]] = {}
    for number, command in enumerate(SUBSET):
        result = subprocess.run(["moeclip", "stage", *command, "--profile", PROFILE], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
        printed |= {name: (float(s), float(gib)) for name, s, gib, _ in USAGE_LINE.findall(result.stderr)}
        if number == 0:
            wait_for_server(folder)  # later stages fork from the warm process it started
    return folder, printed


def test_the_subset_trains_and_evaluates_the_papers_model_at_518(subset):
    folder, printed = subset
    runs = folder / "runs" / PROFILE
    assert list(printed) == ["fetch@visa", "fetch@mvtec", "fetch@headct", "prepare@visa", "prepare@mvtec",
                             "prepare@headct", "train@visa", "evaluate-visa@mvtec", "evaluate-visa@headct"]
    seconds, peak = printed["train@visa"]
    assert peak > 2.0  # ViT-L-14-336 alone is 1.7 GB in fp32
    payload = torch.load(runs / "train/visa/checkpoint.pt", weights_only=False, map_location="cpu")
    assert (payload["model_config"]["backbone"], payload["model_config"]["image_size"]) == ("ViT-L-14-336", 518)
    assert payload["progress"]["complete"] and len(payload["history"]) == 1  # one step of one image
    mvtec = json.loads((runs / "metrics/evaluate/visa/mvtec.json").read_text())
    headct = json.loads((runs / "metrics/evaluate/visa/headct.json").read_text())
    assert {"image_auroc", "pixel_auroc", "pixel_aupro"} <= set(mvtec)
    assert "image_auroc" in headct and "pixel_auroc" not in headct  # Head CT has labels, no masks
    for stage, (seconds, peak) in printed.items():  # the same numbers are kept per stage
        assert json.loads((runs / "usage" / f"{stage}.json").read_text())["seconds"] == pytest.approx(seconds, abs=0.06)


def test_the_subsets_trees_have_one_class_at_the_real_sizes(subset):
    folder, _ = subset
    raw = folder / "data" / PROFILE / "raw"
    assert sorted(p.name for p in (raw / "mvtec").iterdir()) == ["metal_nut"]
    with Image.open(next((raw / "mvtec/metal_nut/test/good").iterdir())) as image:
        assert image.size == (1024, 1024)
    with Image.open(next((raw / "visa/candle/Data/Images/Anomaly").iterdir())) as image:
        assert (image.format, image.size) == ("JPEG", (1500, 1000))
