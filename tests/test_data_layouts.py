"""Layout parsers: a tiny fixture tree per registry dataset (and the custom layouts) -> manifest rows."""
from __future__ import annotations

import csv
import sys
import types
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from typer.testing import CliRunner

from moeclip.bench.cli import app
from moeclip.data.layouts import parse_layout
from moeclip.data.prepare import prepare_dataset
from moeclip.data.registry import DATASETS

Maker = Callable[..., Path]


def _mask(make: Maker, path: Path) -> Path:
    return make(path, mode="L", value=255)


def _mvtec(root: Path, make: Maker) -> None:
    for name in ("bottle", "metal_nut"):
        make(root / name / "test" / "good" / "000.png")
        make(root / name / "test" / "scratch" / "000.png")
        _mask(make, root / name / "ground_truth" / "scratch" / "000_mask.png")
        make(root / name / "train" / "good" / "000.png")


def _visa(root: Path, make: Maker) -> None:
    rows = []
    for name in ("candle", "pcb1"):
        base = Path(name) / "Data"
        for index, (folder, label, split) in enumerate((("Normal", "normal", "test"), ("Normal", "normal", "train"),
                                                        ("Anomaly", "anomaly", "test"))):
            image = base / "Images" / folder / f"{index:03d}.JPG"
            make(root / image)
            mask = base / "Masks" / "Anomaly" / f"{index:03d}.png" if folder == "Anomaly" else None
            if mask:
                _mask(make, root / mask)
            rows.append({"object": name, "split": split, "label": label, "image": image.as_posix(),
                         "mask": mask.as_posix() if mask else ""})
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)


def _btad(root: Path, make: Maker) -> None:
    for name in ("01", "03"):
        make(root / name / "test" / "ok" / "0000.bmp")
        make(root / name / "test" / "ko" / "0000.bmp")
        _mask(make, root / name / "ground_truth" / "ko" / "0000.png")


def _rsdd(root: Path, make: Maker) -> None:
    base = root / "Metal15"
    make(base / "test" / "good" / "1.bmp")
    make(base / "test" / "anomaly" / "2.bmp")
    _mask(make, base / "ground_truth" / "anomaly" / "2.png")


def _dtd(root: Path, make: Maker) -> None:
    for name in ("Woven_001", "Blotchy_099"):
        make(root / name / "test" / "good" / "000.png")
        make(root / name / "test" / "bad" / "000.png")
        _mask(make, root / name / "ground_truth" / "bad" / "000_mask.png")


def _bmad(root: Path, make: Maker) -> None:
    make(root / "test" / "good" / "img" / "a.png", mode="L")
    make(root / "test" / "Ungood" / "img" / "b.png", mode="L")
    _mask(make, root / "test" / "Ungood" / "label" / "b.png")


def _headct(root: Path, make: Maker) -> None:
    make(root / "test" / "good" / "a.png", mode="L")
    make(root / "test" / "defect" / "b.png", mode="L")


def _colon(root: Path, make: Maker) -> None:
    make(root / "images" / "1.png")
    _mask(make, root / "masks" / "1.png")


def _endo(root: Path, make: Maker) -> None:
    make(root / "test dataset" / "images" / "1.jpg")
    _mask(make, root / "test dataset" / "masks" / "1.jpg")


# dataset -> (builder, normal, anomalous, classes, one class's description)
CASES = {
    "mvtec": (_mvtec, 2, 2, {"bottle", "metal_nut"}, ("metal_nut", "metal nut which has four notched edges")),
    "visa": (_visa, 2, 2, {"candle", "pcb1"}, ("pcb1", "dual ultrasonic distance sensor pcb module")),
    "btad": (_btad, 2, 2, {"01", "03"}, ("03", "product")),
    "rsdd": (_rsdd, 1, 1, {"metal"}, ("metal", "metal")),
    "dtd": (_dtd, 2, 2, {"Woven_001", "Blotchy_099"}, ("Woven_001", "Woven")),
    "brainmri": (_bmad, 1, 1, {"brain"}, ("brain", "scan")),
    "headct": (_headct, 1, 1, {"head"}, ("head", "scan")),
    "liverct": (_bmad, 1, 1, {"liver"}, ("liver", "scan")),
    "retinaoct": (_bmad, 1, 1, {"retina"}, ("retina", "scan")),
    "colondb": (_colon, 0, 1, {"colon"}, ("colon", "colon endoscopy image")),
    "clinicdb": (_colon, 0, 1, {"colon"}, ("colon", "colon endoscopy image")),
    "cvc300": (_colon, 0, 1, {"colon"}, ("colon", "colon endoscopy image")),
    "endo": (_endo, 0, 1, {"polyp"}, ("polyp", "polyp")),
    "kvasir": (_colon, 0, 1, {"colon"}, ("colon", "colon endoscopy image")),
}


def test_every_registry_dataset_has_a_case() -> None:
    assert set(CASES) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_registry_layouts(tmp_path: Path, make_image: Maker, name: str) -> None:
    build, normal, anomalous, classes, (class_name, description) = CASES[name]
    root = tmp_path / name
    build(root, make_image)
    frame = prepare_dataset(name, root, tmp_path / f"{name}.parquet")
    spec = DATASETS[name]
    assert (frame["label"] == 0).sum() == normal and (frame["label"] == 1).sum() == anomalous
    assert set(frame["class_name"]) == classes
    assert set(frame.loc[frame["class_name"] == class_name, "description"]) == {description}
    assert set(frame["domain"]) == {spec.domain} and set(frame["dataset"]) == {name}
    assert set(frame["split"]) == {"test"}
    anomalous_rows = frame[frame["label"] == 1]
    assert anomalous_rows["mask_path"].notna().all() == spec.pixel_metrics
    assert frame.loc[frame["label"] == 0, "mask_path"].isna().all()
    for image, mask in zip(anomalous_rows["image_path"], anomalous_rows["mask_path"]):
        assert Path(image).is_file() and (pd.isna(mask) or Path(mask).is_file())


def test_train_split_is_kept_on_request(tmp_path: Path, make_image: Maker) -> None:
    _mvtec(tmp_path / "m", make_image)
    frame = prepare_dataset("mvtec", tmp_path / "m", tmp_path / "m.parquet", splits=("test", "train"))
    assert (frame["split"] == "train").sum() == 2 and frame.loc[frame["split"] == "train", "label"].eq(0).all()


def test_visa_without_split_csv_warns_and_takes_everything(tmp_path: Path, make_image: Maker) -> None:
    _visa(tmp_path / "v", make_image)
    (tmp_path / "v" / "split_csv" / "1cls.csv").unlink()
    with pytest.warns(UserWarning, match="1cls.csv is missing"):
        result = parse_layout("visa", tmp_path / "v")
    assert len(result.samples) == 6 and {s.split for s in result.samples} == {"test"}
    assert all(s.mask is not None for s in result.samples if s.label == 1)


def test_single_wrapper_folder_is_descended(tmp_path: Path, make_image: Maker) -> None:
    _bmad(tmp_path / "brain" / "BrainMRI", make_image)
    frame = prepare_dataset("brainmri", tmp_path / "brain", tmp_path / "b.parquet")
    assert len(frame) == 2


def test_custom_folders_layout(tmp_path: Path, make_image: Maker) -> None:
    root = tmp_path / "widgets"
    make_image(root / "gear" / "good" / "a.png")
    make_image(root / "gear" / "dent" / "b.png")
    make_image(root / "gear" / "rust" / "c.png")
    _mask(make_image, root / "gear" / "masks" / "b.png")
    _mask(make_image, root / "gear" / "masks" / "c_mask.png")
    make_image(root / "spring_coil" / "good" / "a.png")
    make_image(root / "spring_coil" / "bent" / "z.png")
    _mask(make_image, root / "spring_coil" / "masks" / "z.png")
    frame = prepare_dataset("folders", root, tmp_path / "w.parquet", domain="industrial")
    assert set(frame["dataset"]) == {"widgets"} and len(frame) == 5
    assert frame.loc[frame["label"] == 1, "mask_path"].notna().all()
    assert set(frame["description"]) == {"gear", "spring coil"}


def test_custom_mvtec_layout_with_own_name(tmp_path: Path, make_image: Maker) -> None:
    root = tmp_path / "parts"
    make_image(root / "bolt" / "test" / "good" / "a.png")
    make_image(root / "bolt" / "test" / "bent" / "b.png")
    frame = prepare_dataset("myparts", root, tmp_path / "p.parquet", layout="mvtec", domain="medical")
    assert set(frame["dataset"]) == {"myparts"} and set(frame["domain"]) == {"medical"}
    assert frame["mask_path"].isna().all()  # no masks at all: image-level data only


def test_cli_list_and_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    listing = runner.invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and all(name in listing.output for name in DATASETS)
    calls: list[tuple[Path, int]] = []
    fake = types.ModuleType("moeclip.data.synthetic")
    fake.generate_demo_datasets = lambda out, seed=0: calls.append((out, seed)) or [out / "demo_a"]
    monkeypatch.setitem(sys.modules, "moeclip.data.synthetic", fake)
    demo = runner.invoke(app, ["data", "demo", "--out", str(tmp_path), "--seed", "3"])
    assert demo.exit_code == 0 and calls == [(tmp_path, 3)] and str(tmp_path / "demo_a") in demo.output
