"""Fetch a dataset into `<dest_root>/<name>/`: from http(s) (resumable), Google Drive,
a local archive, or an already-extracted local folder.

Order of sources: an explicit `archive`, an explicit `url`, an archive the user
dropped at `<dest_root>/<name>.<zip|tar|tar.gz|tgz|tar.xz|tar.bz2>`, the
registry URL. Datasets behind a registration page (`manual`) without any of
these raise a `DataError` that says where to get them and where to put them.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import requests
from tqdm import tqdm

from moeclip.data.archive import build_atomically, extract_archive, verify_sha256
from moeclip.data.layouts import is_class_folder, is_class_or_split_folder
from moeclip.data.registry import DATASETS, DatasetSpec, DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CHUNK = 1 << 20
_TIMEOUT = (15, 120)


def _placement_hint(name: str, dest_root: Path) -> str:
    return (
        f"put the archive at {dest_root / name}.zip (or {', '.join(ARCHIVE_SUFFIXES[1:])}) and run "
        f"`moeclip data fetch {name}` again, pass it with --archive FILE, "
        f"or put the extracted folder at {dest_root / name}/"
    )


def _no_source_error(name: str, dest_root: Path) -> DataError:
    spec = DATASETS.get(name)
    if spec is None:
        known = ", ".join(DATASETS)
        return DataError(f"{name!r} is not a registry dataset ({known}); give its source with --url or --archive")
    where = spec.source.instructions or "its publisher"
    return DataError(
        f"{spec.display_name} ({name}) must be downloaded by hand from {where}; then {_placement_hint(name, dest_root)}"
    )


def _dropped_archive(name: str, dest_root: Path) -> Path | None:
    """An archive the user placed next to the destination by hand, if any."""
    for suffix in ARCHIVE_SUFFIXES:
        candidate = dest_root / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _request(url: str, offset: int) -> requests.Response:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    return requests.get(url, headers=headers, stream=True, timeout=_TIMEOUT)


def _open_resumable(url: str, part: Path) -> tuple[requests.Response, int]:
    """A streaming response and the offset it continues from (0 when the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    response = _request(url, offset)
    if offset and response.status_code == 416:  # the .part is not a prefix of this file any more
        response.close()
        part.unlink()
        offset, response = 0, _request(url, 0)
    if not response.ok:
        response.close()
        response.raise_for_status()
    return response, offset if response.status_code == 206 else 0


def http_download(url: str, target: Path) -> Path:
    """Download `url` to `target`, resuming `<target>.part` with a Range request; progress on stderr.

    An interrupted download keeps its `.part` file so that the next call resumes it.
    """
    part = target.with_name(target.name + ".part")
    try:
        response, offset = _open_resumable(url, part)
        with response:
            length = int(response.headers.get("Content-Length", 0))
            total = offset + length if length else None
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=f"download {target.name}"
            ) as bar:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as exc:
        raise DataError(f"could not download {url} to {part}: {exc}") from None
    if total is not None and part.stat().st_size != total:
        raise DataError(f"{part}: download incomplete ({part.stat().st_size} of {total} bytes); fetch again to resume")
    os.replace(part, target)
    return target


def gdrive_download(file_id_or_url: str, target: Path) -> Path:
    """Download a Google Drive file (an id or a drive.google.com URL) with gdown."""
    try:
        import gdown
    except ImportError:
        raise DataError("Google Drive downloads need the `gdown` package (pip install gdown)") from None
    part = target.with_name(target.name + ".part")
    is_url = "://" in file_id_or_url
    try:
        result = gdown.download(
            url=file_id_or_url if is_url else None, id=None if is_url else file_id_or_url,
            output=str(part), quiet=False, resume=True, fuzzy=is_url,
        )
    except Exception as exc:  # gdown raises many unrelated types (its own, requests', OSError)
        raise DataError(f"could not download Google Drive file {file_id_or_url} to {part}: {exc}") from None
    if result is None or not part.is_file():
        raise DataError(f"could not download Google Drive file {file_id_or_url} to {part}")
    os.replace(part, target)
    return target


def _download(url: str, target: Path) -> Path:
    if url.startswith("gdrive:"):
        return gdrive_download(url.removeprefix("gdrive:"), target)
    if "drive.google.com" in url:
        return gdrive_download(url, target)
    return http_download(url, target)


def _local_path(url: str) -> Path | None:
    """The local path a `url` names (plain path or file://), or None for a remote URL."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url or url.startswith("gdrive:"):
        return None
    return Path(url)


def _lone_folder_is_content(spec: DatasetSpec | None) -> Callable[[Path], bool]:
    """How to tell the lone top folder of an archive that is data (kept) from a wrapper (stripped).

    A registry dataset keeps a class folder of its layout (MVTec AD is also sold per class: `bottle/test/...`);
    classless layouts strip it (`Metal15/`, `headct/`). A user's own data, whose layout is not known yet, keeps
    a class or split folder.
    """
    return is_class_or_split_folder if spec is None else partial(is_class_folder, spec.layout)


def _install_local(source: Path, dest: Path, sha256: str | None, link: bool,
                   is_content: Callable[[Path], bool]) -> Path:
    """Install a user's archive (extracted) or folder (copied or symlinked); the source is never changed."""
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if source.is_dir():
        if sha256:
            raise DataError(f"{source}: a sha256 applies to archive files, not folders")
        if link:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(source.resolve(), target_is_directory=True)
            return dest
        return build_atomically(dest, lambda temp: _copy_tree(source, temp))
    if sha256:
        verify_sha256(source, sha256)
    return extract_archive(source, dest, is_content)


def _copy_tree(source: Path, temp: Path) -> None:
    try:
        shutil.copytree(source, temp, dirs_exist_ok=True)
    except (OSError, shutil.Error) as exc:
        raise DataError(f"{source}: could not copy the folder ({exc})") from None


def _install_remote(name: str, url: str, dest: Path, sha256: str | None,
                    is_content: Callable[[Path], bool]) -> Path:
    """Download, verify, extract; the complete download is deleted afterwards, whatever happens."""
    tag = hashlib.sha1(url.encode()).hexdigest()[:10]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = _download(url, dest.parent / f".{name}-{tag}.download")
    except DataError as exc:
        raise DataError(
            f"{name}: {exc}. If this machine is offline, download {url} elsewhere, "
            f"then {_placement_hint(name, dest.parent)}"
        ) from None
    try:
        if sha256:
            verify_sha256(archive, sha256)
        return extract_archive(archive, dest, is_content)
    except DataError as exc:
        raise DataError(f"{exc} (downloaded from {url}; the download was deleted)") from None
    finally:
        archive.unlink(missing_ok=True)


def fetch_dataset(
    name: str,
    dest_root: Path = Path("data/raw"),
    url: str | None = None,
    sha256: str | None = None,
    archive: Path | None = None,
    link: bool = False,
) -> Path:
    """Make `<dest_root>/<name>/` hold the extracted dataset and return it.

    `url`: http(s) URL, `gdrive:<id>`, a drive.google.com URL, or a local path;
    `archive`: a local archive file or extracted folder; `link` symlinks a
    local folder instead of copying it. An existing destination is returned
    as is when no source is given.
    """
    if not _NAME.match(name):
        raise DataError(f"{name!r}: a dataset name may hold only letters, digits, '.', '_' and '-'")
    dest_root = Path(dest_root)
    dest = dest_root / name
    explicit = archive if archive is not None else url
    if dest.exists():
        if explicit is None:
            return dest
        raise DataError(f"{dest}: already exists; remove it to fetch {name} again")
    spec = DATASETS.get(name)
    is_content = _lone_folder_is_content(spec)  # a lone class folder in an archive is the class, not a wrapper
    if explicit is None:
        dropped = _dropped_archive(name, dest_root)
        if dropped is not None:
            return _install_local(dropped, dest, sha256, link, is_content)
        if spec is None or spec.source.url is None:
            raise _no_source_error(name, dest_root)
        return _install_remote(name, spec.source.url, dest, sha256 or spec.source.sha256, is_content)
    local = Path(archive) if archive is not None else _local_path(str(url))
    if local is not None:
        return _install_local(local, dest, sha256, link, is_content)
    return _install_remote(name, str(url), dest, sha256, is_content)
