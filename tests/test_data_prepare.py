"""Validation, summary, manifest round trip, and a real image set prepared end to end."""
from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from rich.console import Console
from typer.testing import CliRunner

from moeclip.bench.cli import app
from moeclip.data.manifest import COLUMNS, load_mask, manifest_sha256, read_manifest, write_manifest
from moeclip.data.prepare import compare_expected, prepare_dataset
from moeclip.data.registry import DATASETS, DataError

Maker = Callable[..., Path]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_all_problems_reported_at_once(tmp_path: Path, make_image: Maker, mvtec_tree) -> None:
    root = mvtec_tree(tmp_path / "m")
    make_image(root / "bottle" / "test" / "good" / "002.png", size=(64, 64))
    _truncate(root / "bottle" / "test" / "good" / "002.png")
    (root / "screw" / "ground_truth" / "crack" / "000_mask.png").unlink()
    make_image(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=(5, 5), mode="L", value=255)
    (root / "grid" / "test" / "good").mkdir(parents=True)
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(app, ["data", "prepare", "mvtec", "--root", str(root), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())  # undo terminal wrapping
    assert "4 problem(s)" in message
    assert f"{root}/bottle/test/good/002.png: unreadable or truncated image" in message
    assert f"{root}/screw/test/crack/000.png: anomalous image has no mask" in message
    assert f"{root}/bottle/ground_truth/crack/000_mask.png: mask size 5x5 differs" in message
    assert f"{root}/grid: class folder has no images" in message
    assert not out.exists()


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "L", "1"])
def test_unusual_image_modes_are_accepted(tmp_path: Path, make_image: Maker, mode: str) -> None:
    root = tmp_path / "scans"
    make_image(root / "test" / "good" / "a.png", mode=mode)
    make_image(root / "test" / "defect" / "b.png", mode=mode)
    frame = prepare_dataset("headct", root, tmp_path / "h.parquet")
    assert len(frame) == 2 and set(frame["width"]) == {8} and set(frame["height"]) == {6}
    if mode == "I;16":
        with Image.open(frame["image_path"][0]) as image:
            assert image.mode.startswith("I")


def test_jpeg_masks_are_thresholded(tmp_path: Path) -> None:
    values = np.zeros((32, 32), dtype=np.uint8)
    values[8:24, 8:24] = 250
    noisy = values.copy()
    noisy[0, 0], noisy[20, 20] = 12, 200  # JPEG-like ringing outside and a dimmer pixel inside
    Image.fromarray(noisy).save(tmp_path / "m.jpg", quality=60)
    Image.fromarray(noisy).save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.jpg"), values > 0)
    assert load_mask(tmp_path / "m.png")[0, 0]  # lossless masks: any non-zero pixel counts


def _frame(root: Path) -> pd.DataFrame:
    return pd.DataFrame({
        "image_path": [str(root / "a" / "x.png"), "a/y.png"], "mask_path": [None, str(root / "a" / "y_mask.png")],
        "label": [0, 1], "class_name": ["a", "a"], "description": ["thing", "thing"], "dataset": ["d", "d"],
        "domain": ["industrial", "industrial"], "split": ["test", "test"], "width": [4, 4], "height": [3, 3],
    })


def test_manifest_round_trip_survives_moving_the_folder(tmp_path: Path) -> None:
    project = tmp_path / "project"
    root = project / "data" / "raw" / "d"
    path = project / "manifests" / "d.parquet"
    write_manifest(_frame(root), path, root)
    digest = manifest_sha256(path)
    shutil.move(project, tmp_path / "moved")
    frame = read_manifest(tmp_path / "moved" / "manifests" / "d.parquet")
    moved_root = tmp_path / "moved" / "data" / "raw" / "d"
    assert list(frame.columns) == list(COLUMNS)
    assert list(frame["image_path"]) == [str(moved_root / "a" / "x.png"), str(moved_root / "a" / "y.png")]
    assert pd.isna(frame["mask_path"][0]) and frame["mask_path"][1] == str(moved_root / "a" / "y_mask.png")
    assert frame["label"].tolist() == [0, 1] and frame["width"].dtype.kind == "i"
    assert manifest_sha256(tmp_path / "moved" / "manifests" / "d.parquet") == digest


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda f: f.drop(columns="split"), "lacks columns"),
        (lambda f: f.assign(label=[0, 2]), "'label'"),
        (lambda f: f.assign(domain=["industrial", "space"]), "'domain'"),
        (lambda f: f.assign(width=["4", "4"]), "'width' must hold integers"),
        (lambda f: f.assign(class_name=[1, 2]), "wrong type"),
        (lambda f: f.assign(image_path=["/elsewhere/x.png", "a/y.png"]), "outside the dataset root"),
    ],
)
def test_write_manifest_rejects_bad_frames(tmp_path: Path, change, problem: str) -> None:
    path = tmp_path / "m.parquet"
    with pytest.raises(DataError, match=problem):
        write_manifest(change(_frame(tmp_path / "root")), path, tmp_path / "root")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_count_differences_are_warnings(tmp_path: Path, mvtec_tree) -> None:
    root = mvtec_tree(tmp_path / "m")
    console = Console(record=True, width=200)
    frame = prepare_dataset("mvtec", root, tmp_path / "m.parquet", console=console)
    text = console.export_text()
    assert "4 normal test images, the paper lists 467 (-463)" in text
    assert "expected classes not found: cable" in text
    assert "total" in text and "bottle" in text
    assert compare_expected(frame, DATASETS["mvtec"]) and (tmp_path / "m.parquet").is_file()


def test_real_images_in_mvtec_layout(tmp_path: Path) -> None:
    """Photos that ship with scikit-learn (not written here), arranged as MVTec-AD with a drawn mask."""
    images = Path(find_spec("sklearn").origin).parent / "datasets" / "images"  # found without importing sklearn
    root = tmp_path / "photos"
    for name in ("china.jpg", "flower.jpg"):
        (root / "scene" / "test" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / name, root / "scene" / "test" / "good" / name)
    (root / "scene" / "test" / "stain").mkdir(parents=True)
    shutil.copyfile(images / "china.jpg", root / "scene" / "test" / "stain" / "china.jpg")
    with Image.open(root / "scene" / "test" / "stain" / "china.jpg") as photo:
        mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).ellipse((100, 100, 220, 180), fill=255)
    (root / "scene" / "ground_truth" / "stain").mkdir(parents=True)
    mask.save(root / "scene" / "ground_truth" / "stain" / "china_mask.png")

    out = tmp_path / "photos.parquet"
    prepare_dataset("photos", root, out, layout="mvtec")
    frame = read_manifest(out)
    assert len(frame) == 3 and frame["label"].tolist().count(1) == 1
    assert set(zip(frame["width"], frame["height"])) == {(640, 427)}
    anomalous = frame[frame["label"] == 1].iloc[0]
    assert load_mask(Path(anomalous["mask_path"])).sum() > 1000
    with Image.open(anomalous["image_path"]) as image:
        assert image.convert("RGB").size == (anomalous["width"], anomalous["height"])
