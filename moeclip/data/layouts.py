"""Folder-layout parsers: turn an extracted dataset folder into one `Sample` per image.

Parsers only look at file names; reading and validating the images is the
job of `prepare.py`. Layouts without a class level (RSDD, Head CT, BMAD, the
colon sets, Endo) return `class_name=None`, which the preparer replaces by
the registry's single class (or the folder name for custom data).

Masks are matched to images by file stem: `<stem>_mask.*` first, then
`<stem>.*`, with any image extension (BTAD mixes bmp and png).
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from moeclip.data.registry import DataError, texture_name

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
NORMAL_FOLDERS = frozenset({"good", "ok"})
# What a class folder holds: MVTec-style `<class>/test/`, VisA's `<class>/Data/` (see CLASS_FOLDER_HOLDS).
_TREE_CLASS_HOLDS = "test"
_VISA_CLASS_HOLDS = "Data"


@dataclass(frozen=True)
class Sample:
    """One image found by a layout parser (paths are absolute or relative to the cwd)."""

    image: Path
    label: int
    class_name: str | None
    mask: Path | None = None
    split: str = "test"
    description: str | None = None


@dataclass
class LayoutResult:
    """Samples plus every class folder seen, so that empty classes can be reported."""

    samples: list[Sample]
    classes: list[str] = field(default_factory=list)


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "__MACOSX"))


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted; none if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _mask_lookup(folder: Path) -> Callable[[str], Path | None]:
    """Index the masks of `folder` once; return stem -> mask path (or None)."""
    index = {p.stem: p for p in _images(folder)}
    return lambda stem: index.get(f"{stem}_mask") or index.get(stem)


def _descend(root: Path, marker: str) -> Path:
    """`root` if it holds `marker`, else its single sub-folder holding it (a wrapper folder), else `root`."""
    if (root / marker).exists():
        return root
    inner = [d for d in _subdirs(root) if (d / marker).exists()]
    return inner[0] if len(inner) == 1 else root


def _class_dirs(root: Path, marker: str) -> list[tuple[Path, str | None]]:
    """Class folders holding `marker`; the root itself (class None) when it holds `marker`."""
    if (root / marker).is_dir():
        return [(root, None)]
    return [(d, d.name) for d in _subdirs(root) if (d / marker).is_dir()]


def _labelled_folder(
    folder: Path, label: int, class_name: str | None, split: str,
    masks: Callable[[str], Path | None] | None, description: str | None = None,
) -> list[Sample]:
    """Samples for every image of one folder that shares a label (and a mask folder)."""
    return [
        Sample(img, label, class_name, masks(img.stem) if masks else None, split, description)
        for img in _images(folder)
    ]


def _class_tree(class_dir: Path, class_name: str | None, description: str | None = None) -> list[Sample]:
    """MVTec-style class folder: `<split>/<good|ok|defect>/*`, masks in `ground_truth/<defect>/`."""
    samples: list[Sample] = []
    for split in ("test", "train"):
        for folder in _subdirs(class_dir / split):
            label = 0 if folder.name.lower() in NORMAL_FOLDERS else 1
            masks = _mask_lookup(class_dir / "ground_truth" / folder.name) if label else None
            samples += _labelled_folder(folder, label, class_name, split, masks, description)
    return samples


def _parse_class_trees(root: Path, describe: Callable[[str], str | None] = lambda _: None) -> LayoutResult:
    dirs = _class_dirs(root, _TREE_CLASS_HOLDS)
    samples = [s for d, name in dirs for s in _class_tree(d, name, describe(name) if name else None)]
    return LayoutResult(samples, [name for _, name in dirs if name])


def parse_mvtec(root: Path) -> LayoutResult:
    """MVTec-AD: `<class>/test/good/*`, `<class>/test/<defect>/*`, masks
    `<class>/ground_truth/<defect>/<name>_mask.png`, plus `<class>/train/good/*`.

    Also the first custom layout for users' own data (any class names).
    """
    return _parse_class_trees(root)


def parse_btad(root: Path) -> LayoutResult:
    """BTAD: `<class>/test/ok/*`, `<class>/test/ko/*`, masks `<class>/ground_truth/ko/*` (bmp or png)."""
    return _parse_class_trees(root)


def parse_dtd(root: Path) -> LayoutResult:
    """DTD-Synthetic: `<Texture_id>/test/{good,bad}/*`, masks `<Texture_id>/ground_truth/bad/<name>_mask.png`.

    The class stays the folder name (12 classes); its description is the texture name.
    """
    return _parse_class_trees(root, texture_name)


def _classless(result: LayoutResult) -> LayoutResult:
    return LayoutResult([replace(s, class_name=None) for s in result.samples])


def parse_rsdd(root: Path) -> LayoutResult:
    """RSDD: `Metal15/test/{good,anomaly}/*.bmp`, masks `Metal15/ground_truth/anomaly/*.png`; one class."""
    return _classless(_parse_class_trees(root))


def parse_headct(root: Path) -> LayoutResult:
    """Head CT: `test/good/*`, `test/defect/*`; no masks; one class."""
    return _classless(_parse_class_trees(root))


def parse_bmad(root: Path) -> LayoutResult:
    """BMAD (Brain MRI, Liver CT, Retina OCT): `test/good/img/*`, `test/Ungood/img/*`,
    masks `test/Ungood/label/*`; `train/good/img/*` as the train split; one class."""
    root = _descend(root, "test")
    samples: list[Sample] = []
    for split in ("test", "train"):
        for folder in _subdirs(root / split):
            label = 0 if folder.name.lower() in NORMAL_FOLDERS else 1
            masks = _mask_lookup(folder / "label") if label else None
            samples += _labelled_folder(folder / "img", label, None, split, masks)
    return LayoutResult(samples)


def parse_colon(root: Path) -> LayoutResult:
    """Colon sets (CVC-ColonDB, CVC-ClinicDB, CVC-300, Kvasir-SEG): `images/*`, masks `masks/*`;
    every image is anomalous; one class."""
    root = _descend(root, "images")
    return LayoutResult(_labelled_folder(root / "images", 1, None, "test", _mask_lookup(root / "masks")))


def parse_endo(root: Path) -> LayoutResult:
    """Endo (EndoTect): `test dataset/images/*.jpg`, JPEG masks `test dataset/masks/*.jpg`; all anomalous."""
    inner = root / "test dataset"
    return parse_colon(inner if inner.is_dir() else root)


def _visa_from_csv(root: Path, table: Path) -> LayoutResult:
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    required = {"object", "split", "label", "image", "mask"}
    if rows and not required <= rows[0].keys():
        raise DataError(f"{table}: expected columns {sorted(required)}, found {sorted(rows[0])}")
    samples = [
        Sample(
            image=root / row["image"],
            label=0 if row["label"].strip().lower() == "normal" else 1,
            class_name=row["object"],
            mask=root / row["mask"] if row["mask"].strip() else None,
            split=row["split"].strip(),
        )
        for row in rows
    ]
    return LayoutResult(samples, sorted({s.class_name for s in samples if s.class_name}))


def _visa_from_folders(root: Path) -> LayoutResult:
    samples: list[Sample] = []
    dirs = _class_dirs(root, _VISA_CLASS_HOLDS)
    for class_dir, name in dirs:
        images = class_dir / _VISA_CLASS_HOLDS / "Images"
        samples += _labelled_folder(images / "Normal", 0, name, "test", None)
        masks = _mask_lookup(class_dir / _VISA_CLASS_HOLDS / "Masks" / "Anomaly")
        samples += _labelled_folder(images / "Anomaly", 1, name, "test", masks)
    return LayoutResult(samples, [name for _, name in dirs if name])


def parse_visa(root: Path) -> LayoutResult:
    """VisA: `<class>/Data/Images/{Normal,Anomaly}/*.JPG`, masks `<class>/Data/Masks/Anomaly/*.png`.

    The train/test split comes from `split_csv/1cls.csv`; without it every
    image is taken as test (with a warning), which is not the ZSAD protocol.
    """
    root = _descend(root, "split_csv")
    table = root / "split_csv" / "1cls.csv"
    if table.is_file():
        return _visa_from_csv(root, table)
    warnings.warn(f"{table} is missing: taking every VisA image as test data", stacklevel=2)
    return _visa_from_folders(root)


def parse_folders(root: Path) -> LayoutResult:
    """Your own data: `<class>/good/*` normal, `<class>/<defect>/*` anomalous, masks `<class>/masks/<stem>.*`.

        <root>/<class>/good/*           normal images
        <root>/<class>/<any other>/*    anomalous images (folder name = defect type)
        <root>/<class>/masks/<stem>.*   optional mask of the anomalous image with that stem
                                        (`<stem>_mask.*` also matches; stems must be unique per class)

    Everything is test data. For MVTec-style data with train/ and ground_truth/, use layout `mvtec`.
    """
    samples: list[Sample] = []
    classes = _subdirs(root)
    for class_dir in classes:
        masks = _mask_lookup(class_dir / "masks")
        for folder in _subdirs(class_dir):
            if folder.name == "masks":
                continue
            label = 0 if folder.name.lower() in NORMAL_FOLDERS else 1
            samples += _labelled_folder(folder, label, class_dir.name, "test", masks if label else None)
    return LayoutResult(samples, [d.name for d in classes])


LAYOUTS: dict[str, Callable[[Path], LayoutResult]] = {
    "mvtec": parse_mvtec,
    "visa": parse_visa,
    "btad": parse_btad,
    "rsdd": parse_rsdd,
    "dtd": parse_dtd,
    "bmad": parse_bmad,
    "headct": parse_headct,
    "colon": parse_colon,
    "endo": parse_endo,
    "folders": parse_folders,
}

# The folder a class folder holds, for each layout with a class level; the classless layouts (rsdd, headct,
# bmad, colon, endo) are absent. This tells a single-class archive (`bottle/test/...`) from a wrapper folder.
CLASS_FOLDER_HOLDS: dict[str, str] = {
    "mvtec": _TREE_CLASS_HOLDS,
    "btad": _TREE_CLASS_HOLDS,
    "dtd": _TREE_CLASS_HOLDS,
    "visa": _VISA_CLASS_HOLDS,
}

# A user's own class tree, whose layout is not known when it is fetched: these folders make their parent a
# class folder (`bottle/test/good/...`), or are a split folder themselves.
CLASS_TREE_FOLDERS = frozenset({"test", "train", "ground_truth"})


def is_class_folder(layout: str, folder: Path) -> bool:
    """Whether `folder` is one class of `layout` (it holds what the layout's class folders hold), so that an
    archive of that class alone keeps its name; always False for a classless layout."""
    holds = CLASS_FOLDER_HOLDS.get(layout)
    return holds is not None and (folder / holds).is_dir()


def is_class_or_split_folder(folder: Path) -> bool:
    """Whether `folder` is a class folder or a split folder of a user's own class tree (any layout): kept
    when an archive holds it alone, so the class keeps its name (or prepare can name the missing class)."""
    return folder.name.lower() in CLASS_TREE_FOLDERS or any((folder / name).is_dir() for name in CLASS_TREE_FOLDERS)


def layout_shapes() -> dict[str, str]:
    """Each layout's folder shape: the first paragraph of its parser's docstring, on one line."""
    return {name: " ".join((parse.__doc__ or "").strip().split("\n\n")[0].split()) for name, parse in LAYOUTS.items()}


def parse_layout(layout: str, root: Path) -> LayoutResult:
    """Run the parser named `layout` on `root`; unknown names and missing roots are `DataError`s."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    return LAYOUTS[layout](root)
