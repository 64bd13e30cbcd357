"""A unit's result kept on disk under the digest of its inputs, so a re-run reads it back instead of computing
it again, and a gathering step (in another process, perhaps on another machine) finds it."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from moeclip.bench.stages.common import PACKAGE_FOLDER, code_digest, digest, write_json
from moeclip.data.archive import file_sha256
from moeclip.errors import MoeclipError

# The code an evaluation's results depend on: a change to any of them evaluates again (a change elsewhere in
# a stage's code re-runs the stage, which keeps the results).
EVALUATION_CODE = ("methods", "evaluation.py", "metrics", "cost.py", "checkpoint.py", "data/dataset.py",
                   "data/transforms.py")


@functools.cache
def evaluation_code() -> str:
    return code_digest(PACKAGE_FOLDER, EVALUATION_CODE)


def evaluation_key(checkpoint: Path, manifest: Path | None, **settings: Any) -> str:
    """The digest of what an evaluation of `checkpoint` (on `manifest`, with `settings`) computes from."""
    if not checkpoint.is_file():
        raise MoeclipError(f"'{checkpoint}' is missing: the training (a unit or stage before this one) has not run")
    return digest({"checkpoint": file_sha256(checkpoint), "code": evaluation_code(), **settings,
                   "manifest": manifest and file_sha256(manifest)})


def kept_result(folder: Path, key: str) -> Any | None:
    """The result kept for `key`, or None."""
    path = folder / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def keep_result(folder: Path, key: str, value: Any) -> Any:
    """`value` kept as `folder/<key>.json`, the results of earlier inputs removed; returns `value`."""
    for old in folder.glob("*.json"):
        old.unlink()
    write_json(folder / f"{key}.json", value)
    return value


def only_result(folder: Path) -> Any:
    """The one result a unit kept in `folder` (for the gathering step)."""
    files = sorted(folder.glob("*.json"))
    if len(files) != 1:
        raise MoeclipError(f"'{folder}' should hold one result and holds {len(files)}: run its unit again")
    return json.loads(files[0].read_text())


def keep_only(folder: Path, names: set[str]) -> None:
    """Remove every entry of `folder` not named in `names` (results of variants, datasets or layouts a run no
    longer has), so a stage's output holds only live results and is the same files whatever ran before."""
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name not in names:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
