"""Prepare a manifest: parse a dataset folder, validate every image and mask, summarise, write parquet.

All problems are collected before anything is reported, so one run lists
every bad file. Grayscale, 16-bit, RGBA and palette images are accepted
(their modes show in the summary). JPEG masks are accepted as they are and
thresholded at load time (`moeclip.data.manifest.load_mask`).
"""
from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from moeclip.data.layouts import CLASS_TREE_FOLDERS, LAYOUTS, Sample, parse_layout
from moeclip.data.manifest import COLUMNS, DOMAINS, write_manifest
from moeclip.data.registry import DATASETS, DataError, DatasetSpec


@dataclass(frozen=True)
class Checked:
    """What validating one sample found: the image size and mode, and any problems (file-named)."""

    width: int
    height: int
    mode: str
    problems: tuple[str, ...] = ()


def _read_size(path: Path) -> tuple[tuple[int, int], str]:
    """(size, mode) after a full decode: `verify` finds corrupt structure, `load` truncated pixel data."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        return image.size, image.mode


def _unreadable(path: Path, what: str, exc: Exception) -> str:
    return f"{path}: unreadable or truncated {what} ({type(exc).__name__}: {exc})"


def _mask_problems(mask: Path, image: Path, size: tuple[int, int]) -> tuple[str, ...]:
    try:
        mask_size, _ = _read_size(mask)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad files
        return (_unreadable(mask, "mask", exc),)
    if mask_size != size:
        found, wanted = "x".join(map(str, mask_size)), "x".join(map(str, size))
        return (f"{mask}: mask size {found} differs from its image {image} ({wanted})",)
    return ()


def check_sample(sample: Sample, masks_required: bool) -> Checked:
    """Validate one image and its mask; never raises for bad files, it reports them."""
    try:
        size, mode = _read_size(sample.image)
    except Exception as exc:  # as above: any decoder failure is a problem of this file
        return Checked(0, 0, "", (_unreadable(sample.image, "image", exc),))
    if sample.mask is not None:
        problems = _mask_problems(sample.mask, sample.image, size)
    elif masks_required and sample.label == 1:
        problems = (f"{sample.image}: anomalous image has no mask",)
    else:
        problems = ()
    return Checked(size[0], size[1], mode, problems)


def validate_samples(samples: Sequence[Sample], masks_required: bool, workers: int = 8) -> list[Checked]:
    """Check every sample in a thread pool (image decoding releases the GIL), with a progress bar."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda s: check_sample(s, masks_required), samples)
        return list(tqdm(results, total=len(samples), desc="validate", unit="img"))


CLASS_FOLDER_LAYOUTS = ("mvtec", "folders")  # layouts whose class is the name of a folder


def _resolve_target(name_or_layout: str, root: Path, layout: str | None) -> tuple[DatasetSpec | None, str, str]:
    """(registry spec or None, dataset name, layout name) for a registry name, a layout name or a custom name."""
    if name_or_layout in DATASETS:
        spec = DATASETS[name_or_layout]
        return spec, spec.name, layout or spec.layout
    if layout is None and name_or_layout in LAYOUTS:
        return None, root.name, name_or_layout
    if layout is None:
        raise DataError(
            f"{name_or_layout!r} is neither a registry dataset ({', '.join(DATASETS)}) nor a layout "
            f"({', '.join(LAYOUTS)}); for your own data pass a layout, e.g. --layout folders"
        )
    return None, name_or_layout, layout


def _check_class_folders(root: Path, layout: str, classes: set[str | None]) -> None:
    """A user's class-tree data must name its classes by folder: a tree that starts with a split folder
    would make the class 'test' (layout folders) or the dataset's own name (layout mvtec)."""
    if layout in CLASS_FOLDER_LAYOUTS and (None in classes or classes & CLASS_TREE_FOLDERS):
        splits = ", ".join(sorted(CLASS_TREE_FOLDERS))
        raise DataError(f"{root}: the tree starts with a split folder ({splits}) instead of class folders: move it "
                        f"into <root>/<class name>/ (e.g. {root}/bottle/test/good/...) so the class keeps its name")


def _class_of(sample: Sample, spec: DatasetSpec | None, root: Path) -> str:
    """Class-less layouts take the registry's single class, else the dataset folder's name."""
    if sample.class_name:
        return sample.class_name
    if spec is not None and len(spec.classes) == 1:
        return next(iter(spec.classes))
    return root.name


def _description(class_name: str, sample: Sample, spec: DatasetSpec | None) -> str:
    known = spec.description(class_name) if spec is not None else None
    return known or sample.description or class_name.replace("_", " ")


def _empty_classes(root: Path, classes: list[str], frame: pd.DataFrame, splits: Sequence[str]) -> list[str]:
    present = set(frame["class_name"])
    return [
        f"{root / name}: class folder has no images in splits {list(splits)}" for name in classes if name not in present
    ]


def _build_frame(
    samples: Sequence[Sample], checks: Sequence[Checked], spec: DatasetSpec | None,
    dataset: str, domain: str, root: Path,
) -> pd.DataFrame:
    rows = []
    for sample, checked in zip(samples, checks):
        class_name = _class_of(sample, spec, root)
        rows.append({
            "image_path": str(sample.image),
            "mask_path": None if sample.mask is None else str(sample.mask),
            "label": sample.label,
            "class_name": class_name,
            "description": _description(class_name, sample, spec),
            "dataset": dataset,
            "domain": domain,
            "split": sample.split,
            "width": checked.width,
            "height": checked.height,
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def compare_expected(frame: pd.DataFrame, spec: DatasetSpec) -> list[str]:
    """Differences between the test split and the registry (paper Table 3); empty when they agree."""
    test = frame[frame["split"] == "test"]
    notes = []
    for label, expected, kind in ((0, spec.expected_normal, "normal"), (1, spec.expected_anomalous, "anomalous")):
        found = int((test["label"] == label).sum())
        if found != expected:
            notes.append(
                f"{spec.display_name}: {found} {kind} test images, the paper lists {expected} ({found - expected:+d})"
            )
    missing = sorted(set(spec.classes) - set(test["class_name"]))
    extra = sorted(set(test["class_name"]) - set(spec.classes))
    if missing:
        notes.append(f"{spec.display_name}: expected classes not found: {', '.join(missing)}")
    if extra:
        notes.append(f"{spec.display_name}: classes not in the registry: {', '.join(extra)}")
    if notes and spec.count_note:
        notes.append(f"{spec.display_name}: note: {spec.count_note}")
    return notes


def _summary_table(frame: pd.DataFrame, modes: dict[str, set[str]], title: str) -> Table:
    table = Table(title=title)
    for header in ("class", "split", "normal", "anomalous", "with mask", "image modes"):
        table.add_column(header, justify="left" if header in ("class", "split", "image modes") else "right")
    for (class_name, split), group in frame.groupby(["class_name", "split"], sort=True):
        table.add_row(
            class_name, split, str(int((group["label"] == 0).sum())), str(int((group["label"] == 1).sum())),
            str(int(group["mask_path"].notna().sum())), ", ".join(sorted(modes[class_name])),
        )
    table.add_row("total", "", str(int((frame["label"] == 0).sum())), str(int((frame["label"] == 1).sum())),
                  str(int(frame["mask_path"].notna().sum())), "", style="bold")
    return table


def prepare_dataset(
    name_or_layout: str,
    root: Path,
    out: Path,
    layout: str | None = None,
    *,
    domain: str | None = None,
    splits: Sequence[str] = ("test",),
    workers: int = 8,
    console: Console | None = None,
) -> pd.DataFrame:
    """Parse `root` with the dataset's (or the given) layout, validate it, write the manifest `out`.

    `name_or_layout` is a registry name, a layout name (custom data named after
    its folder) or any name together with `layout`. Custom data defaults to the
    industrial domain and needs masks only when some anomalous image has one.
    Returns the manifest frame with absolute paths. Raises one `DataError`
    listing every bad file; count differences from the paper are only printed.
    """
    console = console or Console(stderr=True)
    root = Path(os.path.abspath(root))
    spec, dataset, layout = _resolve_target(name_or_layout, root, layout)
    domain = domain or (spec.domain if spec else "industrial")
    if domain not in DOMAINS:
        raise DataError(f"unknown domain {domain!r}; use one of {sorted(DOMAINS)}")
    parsed = parse_layout(layout, root)
    samples = [s for s in parsed.samples if s.split in splits]
    if not samples:
        raise DataError(f"{root}: no images found for layout {layout!r} in splits {list(splits)}")
    if spec is None:
        _check_class_folders(root, layout, {s.class_name for s in samples})
    masks_required = spec.pixel_metrics if spec is not None else any(s.mask for s in samples)
    checks = validate_samples(samples, masks_required, workers)
    frame = _build_frame(samples, checks, spec, dataset, domain, root)
    problems = [p for c in checks for p in c.problems] + _empty_classes(root, parsed.classes, frame, splits)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{len(problems)} problem(s) in {dataset} at {root}; no manifest written:\n{listing}")
    modes: dict[str, set[str]] = defaultdict(set)
    for class_name, checked in zip(frame["class_name"], checks):
        modes[class_name].add(checked.mode)
    console.print(_summary_table(frame, modes, f"{dataset} ({layout} layout) -> {out}"))
    for note in compare_expected(frame, spec) if spec is not None else []:
        console.print(f"[yellow]warning:[/yellow] {note}")
    write_manifest(frame, Path(out), root)
    return frame
