"""The manifest: one parquet row per image, the contract between data preparation and everything else.

Columns (exactly these): `image_path` (str), `mask_path` (str or null),
`label` (int, 0 normal / 1 anomalous), `class_name`, `description` (the class
description used in prompts), `dataset`, `domain` ("industrial"|"medical"),
`split` ("test"/"train"), `width`, `height` (ints, the image size).

On disk the paths are relative to the dataset root, and the root is stored in
the parquet key-value metadata relative to the manifest's own folder, so a
folder holding both can be moved. `read_manifest` returns absolute paths.

Masks: PNG/BMP masks are binarised with `> 0`; JPEG masks are lossy, so
`load_mask` thresholds them at half intensity instead (see `load_mask`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from moeclip.atomic import atomic_path
from moeclip.data.archive import file_sha256
from moeclip.data.registry import DataError

ROOT_KEY = b"moeclip.root"
SCHEMA = pa.schema(
    [
        ("image_path", pa.string()),
        ("mask_path", pa.string()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("description", pa.string()),
        ("dataset", pa.string()),
        ("domain", pa.string()),
        ("split", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
INT_COLUMNS = ("label", "width", "height")
DOMAINS = frozenset({"industrial", "medical"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})


def _check_values(frame: pd.DataFrame) -> None:
    """Reject frames that would break readers: missing columns, nulls, bad labels or domains."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"manifest frame lacks columns {missing}")
    for column in COLUMNS:
        if column != "mask_path" and frame[column].isna().any():
            raise DataError(f"manifest column {column!r} has null values")
    for column in INT_COLUMNS:
        if not pd.api.types.is_integer_dtype(frame[column]):
            raise DataError(f"manifest column {column!r} must hold integers, not {frame[column].dtype}")
    if not frame["label"].isin([0, 1]).all():
        raise DataError("manifest column 'label' must hold only 0 (normal) and 1 (anomalous)")
    if not frame["domain"].isin(DOMAINS).all():
        raise DataError(f"manifest column 'domain' must be one of {sorted(DOMAINS)}")
    if len(frame) and ((frame["width"] <= 0) | (frame["height"] <= 0)).any():
        raise DataError("manifest columns 'width'/'height' must be positive")


def _relative(value: object, root: Path) -> str | None:
    """A path as stored: posix, relative to `root` (absolute inputs must lie under it)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    path = Path(str(value))
    if path.is_absolute():
        try:
            path = path.relative_to(root)
        except ValueError:
            raise DataError(f"{path}: file lies outside the dataset root {root}") from None
    return path.as_posix()


def _to_table(frame: pd.DataFrame, root: Path) -> pa.Table:
    columns = {c: frame[c].tolist() for c in COLUMNS}
    columns["image_path"] = [_relative(v, root) for v in columns["image_path"]]
    columns["mask_path"] = [_relative(v, root) for v in columns["mask_path"]]
    try:
        return pa.Table.from_pydict(columns, schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"manifest frame has a column of the wrong type: {exc}") from None


def write_manifest(frame: pd.DataFrame, path: Path, root: Path) -> None:
    """Validate `frame` and write it atomically (temp file + os.replace): never a half-written manifest."""
    _check_values(frame)
    path = Path(os.path.abspath(path))
    root = Path(os.path.abspath(root))
    table = _to_table(frame, root)
    relative_root = os.path.relpath(root, path.parent)
    table = table.replace_schema_metadata({ROOT_KEY: Path(relative_root).as_posix().encode()})
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def manifest_root(path: Path) -> Path:
    """The absolute dataset root recorded in the manifest at `path`."""
    metadata = pq.read_schema(path).metadata or {}
    if ROOT_KEY not in metadata:
        raise DataError(f"{path}: not a moeclip manifest (no dataset root in its metadata)")
    return Path(os.path.normpath(Path(path).absolute().parent / metadata[ROOT_KEY].decode()))


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest with absolute `image_path`/`mask_path` (null masks stay null)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest file does not exist")
    root = manifest_root(path)
    frame = pq.read_table(path).to_pandas()
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks columns {missing}")
    frame = frame[list(COLUMNS)]
    frame["image_path"] = [str(root / p) for p in frame["image_path"]]
    frame["mask_path"] = pd.Series(
        [None if pd.isna(p) else str(root / p) for p in frame["mask_path"]], index=frame.index, dtype=object
    )
    return frame


def manifest_sha256(path: Path) -> str:
    """Hex sha256 of the manifest file, e.g. to tag experiment runs with the exact data used."""
    return file_sha256(path)


def load_mask(path: Path) -> np.ndarray:
    """A boolean mask (H, W). JPEG masks carry compression noise, so they are thresholded at
    half of the maximum intensity; lossless masks count any non-zero pixel as anomalous."""
    with Image.open(path) as image:
        values = np.asarray(image if image.mode in ("1", "L", "I", "I;16") else image.convert("L"))
    if Path(path).suffix.lower() in JPEG_SUFFIXES:
        return values >= 128
    return values > 0
