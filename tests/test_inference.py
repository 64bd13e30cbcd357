"""Scoring a user's own images: the calibrated scale, batch independence, inputs, outputs and one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from moeclip.bench.cli import run as cli_run
from moeclip.calibration import Calibration, best_f1_threshold, calibrate
from moeclip.checkpoint import load_model, read_calibration, read_checkpoint, save_checkpoint, store_calibration
from moeclip.data.manifest import read_manifest
from moeclip.data.prepare import prepare_dataset
from moeclip.data.registry import DataError
from moeclip.data.synthetic import generate_demo_dataset
from moeclip.evaluation import raw_class_outputs
from moeclip.figures import prediction_figure
from moeclip.inference import collect_images, output_names, predict_images, run_prediction
from tiny_models import randomised, tiny_config

RANGES = Calibration(map_low=0.0, map_high=10.0, score_low=0.2, score_high=0.6, image_threshold=0.5,
                     pixel_threshold=0.7, images=4)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A tiny random-weight checkpoint calibrated on two synthetic VisA classes, and that data."""
    folder = tmp_path_factory.mktemp("calibrated")
    raw = generate_demo_dataset("visa", folder / "raw", per_class=3, classes=2)
    prepare_dataset("visa", raw, folder / "visa.parquet")
    frame = read_manifest(folder / "visa.parquet")
    checkpoint = folder / "checkpoint.pt"
    save_checkpoint(checkpoint, randomised(tiny_config()), 0)
    model, _ = load_model(checkpoint)
    store_calibration(checkpoint, calibrate(model, frame, batch_size=4))
    return checkpoint, frame


def _images(folder: Path, count: int, seed: int = 0, suffix: str = ".png") -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"part{index}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# -- the calibrated scale --------------------------------------------------------------------------
def test_calibrated_scores_follow_the_stored_ranges_and_the_domains_rule():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1], maps[1, 2, 2], maps[2, 0, 0] = 5.0, 20.0, -3.0  # peaks 5 (half way), 20 and 0 (clipped)
    scores = torch.tensor([0.4, 0.6, 0.0])                           # half way, top, below the range
    assert RANGES.scores(maps, scores, "industrial").tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert RANGES.scores(maps, scores, "medical").tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert RANGES.scores(maps, torch.tensor([0.2, 0.2, 0.6]), "industrial").tolist() == pytest.approx([0.25, 0.5, 0.5])
    assert RANGES.scores(maps, torch.tensor([0.2, 0.2, 0.6]), "medical").tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert RANGES.maps(torch.tensor([-1.0, 2.5, 12.0])).tolist() == pytest.approx([0.0, 0.25, 1.0])


def test_the_threshold_is_the_score_with_the_best_f1():
    # >= 0.35: 2 TP, 1 FP (F1 0.8); >= 0.4: 1 TP, 1 FP (0.5); >= 0.8: 1 TP (0.67); >= 0.1: F1 0.67.
    assert best_f1_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.35


def test_calibration_is_the_documented_statistics_of_the_raw_outputs(calibrated):
    checkpoint, frame = calibrated
    stored = read_calibration(checkpoint, read_checkpoint(checkpoint))
    model, _ = load_model(checkpoint)
    outputs = [out for _, out in raw_class_outputs(model, frame, 4)]
    maps = torch.cat([o["maps"] for o in outputs])
    scores = torch.cat([o["scores"] for o in outputs]).numpy()
    labels = torch.cat([o["labels"] for o in outputs]).numpy()
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps[:, None], 64)[:, 0].numpy()
    peaks = maps.flatten(1).amax(1).numpy()
    assert stored.images == len(frame) == len(labels)
    assert stored.map_low == pytest.approx(float(np.quantile(pooled, 0.01)))
    assert stored.map_high == pytest.approx(float(np.quantile(peaks, 0.99)))
    assert (stored.score_low, stored.score_high) == pytest.approx(
        (float(np.quantile(scores, 0.01)), float(np.quantile(scores, 0.99))))
    final = stored.scores(maps, torch.from_numpy(scores), "industrial").numpy()
    assert stored.image_threshold == pytest.approx(best_f1_threshold(final, labels))
    assert stored.pixel_threshold is not None and 0.0 <= stored.pixel_threshold <= 1.0


def test_a_score_does_not_depend_on_the_other_images_of_the_call(calibrated, tmp_path):
    checkpoint, _ = calibrated
    model, payload = load_model(checkpoint)
    calibration = read_calibration(checkpoint, payload)
    one, *others = _images(tmp_path, 5)

    def scores(paths: list[Path], batch_size: int) -> list[float]:
        return [p.score for p in predict_images(model, calibration, paths, "candle", "industrial", batch_size, "cpu")]

    alone = scores([one], 1)[0]
    assert scores([one, *others], 8)[0] == pytest.approx(alone, abs=1e-6)
    assert scores([*others, one], 2)[-1] == pytest.approx(alone, abs=1e-6)
    assert scores([one, one, one], 3) == pytest.approx([alone] * 3, abs=1e-6)


def test_the_overlay_has_a_fixed_scale_a_colour_bar_and_the_score():
    figure = prediction_figure(np.zeros((30, 40, 3), np.uint8), np.full((30, 40), 0.1), "x.png: score 0.123 (normal)")
    overlay_axes, colour_bar = figure.axes
    assert overlay_axes.get_title() == "x.png: score 0.123 (normal)"
    assert overlay_axes.images[-1].get_clim() == (0.0, 1.0)  # a low map stays cold: no per-image rescaling
    assert colour_bar.get_ylabel() == "anomaly (calibrated)"


# -- inputs ------------------------------------------------------------------------------------------
def test_files_folders_and_patterns_name_each_image_once(tmp_path):
    first = _images(tmp_path / "a", 2)
    nested = _images(tmp_path / "b" / "deep", 1, suffix=".jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _images(tmp_path / "a" / ".hidden", 1)
    found = collect_images([str(tmp_path / "a"), str(first[0]), str(tmp_path / "b" / "**" / "*.jpg")])
    assert found == [first[0].resolve(), first[1].resolve(), nested[0].resolve()]


@pytest.mark.parametrize("given, message", [
    ("missing.png", "missing.png: no such file or folder"),
    ("*.nothing", r"\*.nothing: the pattern matches no image file"),
    ("empty", "empty: the folder holds no image"),
    ("notes.txt", "notes.txt: not an image file"),
])
def test_input_mistakes_are_named(tmp_path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=message):
        collect_images([given])


def test_output_names_mirror_the_tree_and_never_collide(tmp_path):
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "b" / "y.png", tmp_path / "b" / "y.jpg"]
    names = output_names(paths)
    assert [str(names[p]) for p in paths] == ["a/x", "b/x", "b/y.png", "b/y.jpg"]


# -- the command -------------------------------------------------------------------------------------
def test_predict_writes_overlays_masks_and_a_results_table(calibrated, tmp_path):
    checkpoint, _ = calibrated
    images = _images(tmp_path / "in" / "left", 2) + _images(tmp_path / "in" / "right", 1, seed=1)
    results = run_prediction([str(tmp_path / "in")], checkpoint, "candle", "industrial", tmp_path / "out",
                             batch_size=2, device="cpu", masks=True)
    assert list(results["path"]) == [str(p.resolve()) for p in images]
    assert set(results["label"]) <= {"normal", "anomalous"} and results["score"].between(0, 1).all()
    threshold = read_calibration(checkpoint, read_checkpoint(checkpoint)).image_threshold
    assert ((results["score"] >= threshold) == (results["label"] == "anomalous")).all()
    for name in ("left/part0", "left/part1", "right/part0"):
        with Image.open(tmp_path / "out" / f"{name}_mask.png") as mask:
            assert mask.size == (50, 40) and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert (tmp_path / "out" / f"{name}_anomaly_map.png").is_file()
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(table.columns) == ["path", "score", "label", "image_score_raw", "map_max_raw", "map_mean_raw",
                                   "map_max", "anomalous_area", "overlay", "mask"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["calibration"]["image_threshold"] == threshold and len(saved["images"]) == 3
    strict = run_prediction([str(tmp_path / "in")], checkpoint, "candle", "industrial", tmp_path / "strict",
                            device="cpu", threshold=1.0)
    assert list(strict["score"]) == list(results["score"])
    assert list(strict["label"]) == ["anomalous" if s >= 1.0 else "normal" for s in strict["score"]]


def _cli(arguments: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["moeclip", *arguments])
    with pytest.raises(SystemExit) as exit_:
        cli_run()
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("mistake, message", [
    ("missing", "missing.png: no such file or folder"),
    ("pattern", "the pattern matches no image file"),
    ("folder", "the folder holds no image"),
    ("truncated", "broken.jpg: cannot be read as an image"),
    ("device", "device 'cuda:64': torch sees"),
    ("out", "is a file, not a folder"),
    ("uncalibrated", "has no calibration"),
    ("threshold", "--threshold 1.5: scores lie in [0, 1]"),
])
def test_each_mistake_is_one_line_before_anything_is_written(calibrated, tmp_path, monkeypatch, capsys, mistake,
                                                            message):
    checkpoint, _ = calibrated
    good = _images(tmp_path / "in", 1)[0]
    broken = tmp_path / "broken.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(broken, quality=95)
    broken.write_bytes(broken.read_bytes()[:300])  # a truncated JPEG
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").write_text("a file")
    uncalibrated = tmp_path / "uncalibrated.pt"
    save_checkpoint(uncalibrated, randomised(tiny_config()), 0)
    out = tmp_path / "out"
    inputs = {"missing": [str(tmp_path / "missing.png")], "pattern": [str(tmp_path / "*.tif")],
              "folder": [str(tmp_path / "empty")], "truncated": [str(good), str(broken)]}.get(mistake, [str(good)])
    options = {"device": ["--device", "cuda:64"], "out": ["--out", str(tmp_path / "taken")],
               "uncalibrated": ["--checkpoint", str(uncalibrated)],
               "threshold": ["--threshold", "1.5"]}.get(mistake, [])
    arguments = ["predict", *inputs, "--checkpoint", str(checkpoint), "--class-name", "candle", "--out", str(out),
                 "--device", "cpu", *options]
    code, lines = _cli(arguments, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_an_uncalibrated_checkpoint_is_calibrated_by_command_and_logged_as_a_servable_model(calibrated, tmp_path,
                                                                                          monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from moeclip.bench.cli import app

    calibrated_checkpoint, frame = calibrated
    manifest = calibrated_checkpoint.parent / "visa.parquet"
    monkeypatch.chdir(tmp_path)
    # An absolute store: MLflow keeps one store per URI in a process, so a relative one would leak into other tests.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["profiles"]["demo"]["tracking"]["uri"] = uri
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoint = tmp_path / "model" / "checkpoint.pt"
    save_checkpoint(checkpoint, randomised(tiny_config()), 0)
    result = CliRunner().invoke(app, ["calibrate", str(checkpoint), "--manifest", str(manifest),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_calibration(checkpoint, read_checkpoint(checkpoint)).images == len(frame)
    model_uri = result.output.split("-m ")[1].split()[0]
    run = MlflowClient(uri).get_run(model_uri.split("/")[1])
    assert run.info.run_name == "model/model" and run.data.params["calibration.images"] == str(len(frame))
