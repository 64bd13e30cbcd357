"""The synthetic demo datasets: determinism, the real on-disk layouts, and visible defects."""

from __future__ import annotations

import csv
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from moeclip.data import synthetic
from moeclip.data.registry import DATASETS, DemoGenerator
from moeclip.data.synthetic import INDUSTRIAL_DEFECTS, SCENES, generate_demo_datasets, place_defect

SIZE, PER_CLASS = 48, 3
MVTEC_CLASSES, VISA_CLASSES = DATASETS["mvtec"].demo.scenes, DATASETS["visa"].demo.scenes  # class -> scene


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo_datasets(out, seed=0, image_size=SIZE, per_class=PER_CLASS)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def _check_mask(mask_path: Path, image_path: Path) -> None:
    """Masks are 0/255 uint8 PNGs of the image's size with some defect pixels."""
    with Image.open(mask_path) as mask, Image.open(image_path) as image:
        assert mask.format == "PNG" and mask.mode == "L" and mask.size == image.size
        values = np.asarray(mask)
    assert set(np.unique(values)) == {0, 255}


def _defect_contrast(normals: list[Path], pairs: list[tuple[Path, Path]]) -> float:
    """Mean deviation from the class's mean normal image inside the masks / outside them."""
    mean = np.stack([_pixels(p) for p in normals]).mean(axis=0)
    inside, outside = [], []
    for image, mask in pairs:
        deviation = np.abs(_pixels(image) - mean).mean(axis=-1)
        defect = np.asarray(Image.open(mask)) > 0
        inside.append(deviation[defect])
        outside.append(deviation[~defect])
    return float(np.concatenate(inside).mean() / np.concatenate(outside).mean())


def _mvtec_pairs(class_dir: Path) -> list[tuple[Path, Path]]:
    return [
        (class_dir / "test" / m.parent.name / m.name.replace("_mask", ""), m)
        for m in sorted((class_dir / "ground_truth").rglob("*.png"))
    ]


def test_every_slug_produced_and_nothing_left_over(demo: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in demo.iterdir()) == sorted(DATASETS)
    assert generate_demo_datasets(tmp_path, per_class=1, image_size=32) == [tmp_path / s for s in DATASETS]


def test_every_declared_generator_and_scene_exists() -> None:
    assert set(synthetic.GENERATORS) == set(typing.get_args(DemoGenerator))
    assert {scene for spec in DATASETS.values() for scene in spec.demo.scenes.values()} <= set(SCENES)


def test_same_seed_same_bytes_other_seed_differs(demo: Path, tmp_path: Path) -> None:
    generate_demo_datasets(tmp_path / "again", seed=0, image_size=SIZE, per_class=PER_CLASS)
    generate_demo_datasets(tmp_path / "other", seed=1, image_size=SIZE, per_class=PER_CLASS)
    reference, again = _files(demo), _files(tmp_path / "again")
    assert reference == again
    other = _files(tmp_path / "other")
    assert sum(other.get(name) != data for name, data in reference.items()) > 0.9 * len(reference)


def test_mvtec_layout(demo: Path) -> None:
    root = demo / "mvtec"
    assert sorted(p.name for p in root.iterdir()) == sorted(MVTEC_CLASSES)
    for name in MVTEC_CLASSES:
        assert len(list((root / name / "train" / "good").glob("*.png"))) == PER_CLASS
        assert len(list((root / name / "test" / "good").glob("*.png"))) == PER_CLASS
        defects = sorted(p for p in (root / name / "test").iterdir() if p.name != "good")
        assert {p.name for p in defects} <= set(INDUSTRIAL_DEFECTS)
        assert sorted(p.name for p in (root / name / "ground_truth").iterdir()) == [p.name for p in defects]
        images = [p for d in defects for p in sorted(d.glob("*.png"))]
        assert len(images) == PER_CLASS
        for image in images:
            _check_mask(root / name / "ground_truth" / image.parent.name / f"{image.stem}_mask.png", image)
        assert len(list((root / name / "ground_truth").rglob("*"))) == len(defects) + len(images)


def test_visa_layout_and_split_csv(demo: Path) -> None:
    root = demo / "visa"
    assert sorted(p.name for p in root.iterdir()) == sorted([*VISA_CLASSES, "split_csv"])
    assert not set(VISA_CLASSES) & set(MVTEC_CLASSES)
    with open(root / "split_csv" / "1cls.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["object", "split", "label", "image", "mask"]
        rows = list(reader)
    listed = {r["image"] for r in rows}
    assert listed == {str(p.relative_to(root)) for p in root.rglob("*.JPG")}
    for row in rows:
        assert row["image"].startswith(f"{row['object']}/Data/Images/")
        with Image.open(root / row["image"]) as image:
            assert image.format == "JPEG" and image.size == (SIZE, SIZE)
        if row["label"] == "anomaly":
            assert row["split"] == "test" and "/Images/Anomaly/" in row["image"]
            assert row["mask"] == row["image"].replace("/Images/", "/Masks/").replace(".JPG", ".png")
            _check_mask(root / row["mask"], root / row["image"])
        else:
            assert row["label"] == "normal" and row["mask"] == "" and "/Images/Normal/" in row["image"]
    for name in VISA_CLASSES:
        test_labels = sorted(r["label"] for r in rows if r["object"] == name and r["split"] == "test")
        assert test_labels == ["anomaly"] * PER_CLASS + ["normal"] * PER_CLASS
        assert sum(r["object"] == name and r["split"] == "train" for r in rows) == PER_CLASS


def test_bmad_layout_is_grayscale_with_labels(demo: Path) -> None:
    test = demo / "brainmri" / "test"
    folders = sorted(p.relative_to(test).as_posix() for p in test.glob("*/*"))
    assert folders == ["Ungood/img", "Ungood/label", "good/img"]
    normals, anomalies = sorted((test / "good" / "img").glob("*.png")), sorted((test / "Ungood" / "img").glob("*.png"))
    assert len(normals) == len(anomalies) == PER_CLASS
    assert sorted(p.name for p in (test / "Ungood" / "label").iterdir()) == [p.name for p in anomalies]
    for image in [*normals, *anomalies]:
        assert Image.open(image).mode == "L"
    for image in anomalies:
        _check_mask(test / "Ungood" / "label" / image.name, image)


def test_colon_layout_has_only_anomalies(demo: Path) -> None:
    root = demo / "colondb"
    assert sorted(p.name for p in root.iterdir()) == ["images", "masks"]
    images = sorted((root / "images").glob("*.png"))
    assert len(images) == PER_CLASS
    assert sorted(p.name for p in (root / "masks").iterdir()) == [p.name for p in images]
    for image in images:
        _check_mask(root / "masks" / image.name, image)


def test_defects_stand_out_from_class_statistics(demo: Path) -> None:
    ratios = {}
    for name in MVTEC_CLASSES:
        class_dir = demo / "mvtec" / name
        ratios[name] = _defect_contrast(sorted((class_dir / "test" / "good").glob("*.png")), _mvtec_pairs(class_dir))
    for name in VISA_CLASSES:
        data = demo / "visa" / name / "Data"
        anomalies = sorted((data / "Images" / "Anomaly").glob("*"))
        pairs = [(p, data / "Masks" / "Anomaly" / f"{p.stem}.png") for p in anomalies]
        ratios[name] = _defect_contrast(sorted((data / "Images" / "Normal").glob("*")), pairs)
    test = demo / "brainmri" / "test"
    brain_pairs = [(p, test / "Ungood" / "label" / p.name) for p in sorted((test / "Ungood" / "img").glob("*"))]
    ratios["brain"] = _defect_contrast(sorted((test / "good" / "img").glob("*")), brain_pairs)
    assert min(ratios.values()) > 1.5, ratios


def _checker_response(pairs: list[tuple[Path, Path]]) -> tuple[float, float]:
    """Mean agreement of the fine detail (pixel minus its 4x4 neighbourhood) with the signature
    checker's sign, inside and outside the masks; about 0 where the checker is absent."""
    inside, outside = [], []
    for image, mask in pairs:
        gray = _pixels(image).mean(axis=-1) / 255.0
        detail = gray - ndimage.uniform_filter(gray, 4, mode="reflect")
        rows, cols = np.indices(gray.shape) // synthetic.SIGNATURE_CELL
        agreement = detail * np.where((rows + cols) % 2 == 1, 1.0, -1.0)
        defect = np.asarray(Image.open(mask)) > 0
        inside.append(agreement[defect])
        outside.append(agreement[~defect])
    return float(np.concatenate(inside).mean()), float(np.concatenate(outside).mean())


def test_every_dataset_marks_defects_with_the_same_checker(demo: Path) -> None:
    """The cross-dataset cue the demo's transfer rests on: one grid-anchored checker, in colour and grayscale."""
    pairs = {
        "mvtec": [pair for name in MVTEC_CLASSES for pair in _mvtec_pairs(demo / "mvtec" / name)],
        "visa": [(p, p.parents[2] / "Masks" / "Anomaly" / f"{p.stem}.png")
                 for p in sorted((demo / "visa").glob("*/Data/Images/Anomaly/*.JPG"))],
        "brainmri": [(p, p.parents[1] / "label" / p.name)
                     for p in sorted((demo / "brainmri" / "test" / "Ungood" / "img").glob("*.png"))],
        "colondb": [(p, demo / "colondb" / "masks" / p.name) for p in sorted((demo / "colondb" / "images").glob("*.png"))],
    }
    for name, dataset_pairs in pairs.items():
        inside, outside = _checker_response(dataset_pairs)
        assert inside > 0.05 and abs(outside) < 0.2 * inside, (name, inside, outside)


@pytest.mark.parametrize("defect", sorted(INDUSTRIAL_DEFECTS))
def test_every_defect_type_changes_exactly_its_mask_on_every_class(defect: str) -> None:
    for index, name in enumerate([*MVTEC_CLASSES.values(), *VISA_CLASSES.values()]):
        scene = SCENES[name](np.random.default_rng(index), 64)
        image, mask = place_defect(np.random.default_rng(index), scene, INDUSTRIAL_DEFECTS[defect])
        change = np.abs(image - scene.image).max(axis=-1)
        assert mask.sum() >= 8
        assert change[mask].mean() > 0.15
        assert change[~mask].mean() < 0.1 * change[mask].mean()
        assert not (mask & (scene.foreground <= synthetic.MASK_THRESHOLD)).any()


def test_failed_generation_leaves_previous_dataset_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate_demo_datasets(tmp_path, per_class=1, image_size=32)
    before = _files(tmp_path)

    save = synthetic._save

    def broken(picture: Image.Image, path: Path) -> None:  # the disk fills up at the first mask
        if "mask" in path.name or "ground_truth" in path.parts or "label" in path.parts:
            raise OSError("disk full")
        save(picture, path)

    monkeypatch.setattr(synthetic, "_save", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_demo_datasets(tmp_path, seed=5, per_class=1, image_size=32)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DATASETS)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_demo_datasets(tmp_path, per_class=0)


def test_smoke_trees_keep_the_first_class_at_each_real_sets_size_and_prepare(tmp_path: Path) -> None:
    """A smoke run's trees: one class per set, images stretched to the real sets' sizes, formats kept."""
    from moeclip.data.prepare import prepare_dataset

    first_class = {"mvtec": "metal_nut", "visa": "candle", "btad": "01", "dtd": "Woven_001"}
    for slug in DATASETS:
        root = synthetic.generate_demo_dataset(slug, tmp_path / "raw", per_class=1, image_size=32, classes=1,
                                               real_sizes=True)
        frame = prepare_dataset(slug, root, tmp_path / "manifests" / f"{slug}.parquet", workers=1)
        assert set(frame["class_name"]) == {first_class.get(slug, frame["class_name"].iloc[0])}, slug
        width, height = DATASETS[slug].real_size
        assert set(zip(frame["width"], frame["height"])) == {(width, height)}, slug
        for mask in frame["mask_path"].dropna():
            with Image.open(root / mask) as picture:
                assert picture.size == (width, height) and set(np.unique(np.asarray(picture))) <= {0, 255}, mask
    visa_rows = list(csv.reader(open(tmp_path / "raw/visa/split_csv/1cls.csv")))[1:]
    assert {row[0] for row in visa_rows} == {"candle"} and len(visa_rows) == 3  # train normal, test normal, anomaly
    with Image.open(next((tmp_path / "raw/btad/01/test/ko").iterdir())) as btad, \
            Image.open(next((tmp_path / "raw/brainmri/test/good/img").iterdir())) as scan:
        assert (btad.format, scan.mode) == ("BMP", "L")


def test_a_class_count_below_one_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classes"):
        synthetic.generate_demo_dataset("mvtec", tmp_path, classes=0)
