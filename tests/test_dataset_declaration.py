"""Adding a dataset is its declaration (moeclip/data/registry.py) plus its params.yaml entries: a toy dataset
declared with `register`, as the benchmark's own are, goes through fetch, prepare and evaluation with nothing
else changed."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moeclip.bench.cli import app
from moeclip.bench.experiments import load_plan
from moeclip.bench.stages import fetch as fetch_stage
from moeclip.bench.stages import prepare as prepare_stage
from moeclip.data import registry
from moeclip.data.archive import file_sha256
from moeclip.data.manifest import read_manifest
from moeclip.data.registry import DATASETS, DatasetSpec, DemoPlan, Source, register
from moeclip.data.synthetic import generate_demo_dataset
from moeclip.evaluation import evaluate_frame
from tiny_models import PARAMS, randomised, tiny_config

# Two classes in the MVTec layout, drawn by the class-folder generator with two of the demo's scenes.
TOY = DatasetSpec(
    name="toy", display_name="Toy parts", table_name="Toy", domain="industrial", layout="mvtec",
    classes={"gear": "metal gear", "felt": "gray felt"}, pixel_metrics=True, image_metrics=True,
    expected_normal=4, expected_anomalous=4, test_images=8, train_images=8,
    source=Source(manual=True, instructions="the toy's maker"),
    real_size=(96, 80),
    demo=DemoPlan("class_folders", {"gear": "metal_nut", "felt": "carpet"}, "{c}/test/good/{i:03d}.png",
                  "{c}/test/broken/{i:03d}.png", "{c}/ground_truth/broken/{i:03d}_mask.png"),
)


@contextmanager
def declared(spec: DatasetSpec) -> Iterator[DatasetSpec]:
    """`spec` registered for the length of a test (the registry itself has no removal: declarations are for good)."""
    register(spec)
    try:
        yield spec
    finally:
        del registry._DATASETS[spec.name]


def _per_class_metrics(manifest: Path) -> pd.DataFrame:
    """The toy's manifest evaluated by the demo's tiny random-weight network."""
    frame = read_manifest(manifest)
    assert set(frame["dataset"]) == {"toy"} and set(frame["domain"]) == {"industrial"}
    assert dict(zip(frame["class_name"], frame["description"])) == {"gear": "metal gear", "felt": "gray felt"}
    per_class = evaluate_frame(randomised(tiny_config()), frame, batch_size=8).per_class
    assert list(per_class["class_name"]) == ["felt", "gear"] and set(per_class["dataset"]) == {"toy"}
    for metric in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert all(0.0 <= value <= 1.0 for value in per_class[metric]), metric
    return per_class


def test_a_declared_dataset_runs_through_the_demo_profiles_fetch_and_prepare_stages(tmp_path: Path) -> None:
    """The demo profile draws it as its DemoPlan says once params.yaml lists it."""
    document = yaml.safe_load(PARAMS.read_text())
    document["datasets"].append("toy")
    document["main"]["targets"]["visa"].append("toy")
    document["profiles"]["demo"]["data"]["root"] = str(tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(document, sort_keys=False))
    with declared(TOY):
        benchmark, profile = load_plan(params, "demo")
        assert "toy" in benchmark.datasets and "toy" in benchmark.main.targets["visa"]
        raw = fetch_stage.run(params, "toy", "demo")
        assert raw == tmp_path / "data" / "raw" / "toy"
        assert sorted(p.relative_to(raw).as_posix() for p in raw.glob("*/*/*")) == [
            "felt/ground_truth/broken", "felt/test/broken", "felt/test/good",
            "gear/ground_truth/broken", "gear/test/broken", "gear/test/good"]
        per_class = _per_class_metrics(prepare_stage.run(params, "toy", "demo"))
    count = profile.data.per_class  # normal and anomalous test images per class
    assert list(per_class["n_images"]) == [2 * count] * 2 and list(per_class["n_anomalous"]) == [count] * 2


def test_a_declared_dataset_is_downloaded_from_its_source_prepared_and_evaluated(tmp_path: Path, http_folder) -> None:
    """The paper profile's route: the declared URL (here 127.0.0.1) serves an archive of the real-sized toy."""
    with declared(TOY):
        tree = generate_demo_dataset("toy", tmp_path / "release", per_class=2, image_size=32, real_sizes=True)
    archive = Path(shutil.make_archive(str(http_folder.folder / "toy"), "zip", tree.parent, tree.name))
    source = Source(url=http_folder.url(archive.name), sha256=file_sha256(archive))
    runner, raw, manifest = CliRunner(), tmp_path / "raw", tmp_path / "toy.parquet"
    with declared(replace(TOY, source=source)):
        listed = runner.invoke(app, ["data", "list"], env={"COLUMNS": "300"})
        fetched = runner.invoke(app, ["data", "fetch", "toy", "--dest", str(raw)])
        prepared = runner.invoke(app, ["data", "prepare", "toy", "--root", str(raw / "toy"), "--out", str(manifest)])
        assert (listed.exit_code, fetched.exit_code, prepared.exit_code) == (0, 0, 0), fetched.output + prepared.output
        assert "Toy parts" in listed.output and sorted(p.name for p in (raw / "toy").iterdir()) == ["felt", "gear"]
        assert set(zip(read_manifest(manifest)["width"], read_manifest(manifest)["height"])) == {(96, 80)}
        _per_class_metrics(manifest)


def test_a_name_is_declared_once() -> None:
    with pytest.raises(ValueError, match="'mvtec' is declared twice"):
        register(replace(TOY, name="mvtec"))
    assert DATASETS["mvtec"].display_name == "MVTec-AD"
