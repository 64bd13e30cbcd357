"""Checksums, atomic folder creation and safe archive extraction (zip, tar, tar.gz/.xz/.bz2).

Every member is checked before it is written: absolute paths, `..`
components, links pointing outside the archive and special files are
rejected. Extraction always happens in a temporary folder next to the
destination, which is renamed into place only when everything succeeded.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from moeclip.data.registry import DataError

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x1f\x8b", "tar"),
    (b"\xfd7zXZ\x00", "tar"),
    (b"BZh", "tar"),
)
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise a `DataError` naming the file when its sha256 differs from `expected`."""
    actual = file_sha256(path)
    if actual.lower() != expected.strip().lower():
        raise DataError(f"{path}: sha256 mismatch (expected {expected.strip().lower()}, got {actual})")


def archive_kind(path: Path) -> str:
    """'zip' or 'tar' (any compression), told from the file's first bytes, not its name."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return "tar"
    raise DataError(f"{path}: not a zip or tar archive (unrecognised file format)")


def _absolute(name: str) -> bool:
    return name.startswith("/") or bool(_DRIVE.match(name))


def member_problem(name: str, link: str | None = None, hardlink: bool = False) -> str | None:
    """Why an archive member is unsafe to extract, or None when it is fine.

    Symlink targets are relative to the member's folder, hardlink targets to
    the archive root (as tar stores them).
    """
    name = name.replace("\\", "/")
    if _absolute(name):
        return "absolute path"
    if ".." in name.split("/"):
        return "path traversal ('..' in the path)"
    if link is None:
        return None
    link = link.replace("\\", "/")
    base = "" if hardlink else posixpath.dirname(name)
    target = posixpath.normpath(posixpath.join(base, link))
    if _absolute(link) or target == ".." or target.startswith("../"):
        return f"link pointing outside the archive (-> {link})"
    return None


def _check_member(archive: Path, name: str, link: str | None = None, hardlink: bool = False) -> None:
    problem = member_problem(name, link, hardlink)
    if problem:
        raise DataError(f"{archive}: unsafe member {name!r}: {problem}; nothing was extracted")


# tarfile's "data" filter (refusing what escapes the target, dropping special permission bits) exists from
# Python 3.11.4; older 3.11 releases (Debian 12 ships 3.11.2) extract without it, after the checks below.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _extract_tar(archive: Path, target: Path, bar: tqdm) -> None:
    # Stream mode reads the (compressed) file once; each member is checked before it is written.
    with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise DataError(f"{archive}: unsafe member {member.name!r}: special file; nothing was extracted")
            link = member.linkname if (member.issym() or member.islnk()) else None
            _check_member(archive, member.name, link, member.islnk())
            tar.extract(member, target, **_TAR_FILTER)
            bar.update(raw.tell() - bar.n)


def _zip_link(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """The target of a symlink member (unix mode bits in external_attr), else None."""
    mode = info.external_attr >> 16
    return archive.read(info).decode() if (mode & 0o170000) == 0o120000 else None


def _extract_zip(archive: Path, target: Path, bar: tqdm) -> None:
    with zipfile.ZipFile(archive) as handle:
        infos = handle.infolist()
        for info in infos:
            _check_member(archive, info.filename, _zip_link(handle, info))
        bar.reset(total=sum(info.compress_size for info in infos))
        for info in infos:
            handle.extract(info, target)
            bar.update(info.compress_size)


def _never(_: Path) -> bool:
    """The default of `extract_archive`: every lone top folder is a wrapper."""
    return False


def _single_top(folder: Path, is_content: Callable[[Path], bool]) -> Path:
    """The one top-level folder of an extracted archive (dropping macOS `__MACOSX`), else `folder`.

    A lone folder is a wrapper (`mvtec_anomaly_detection/`) unless `is_content` says it is data: a class
    folder of a single-class archive (`bottle/test/good/...`) is kept, not stripped, so the class keeps
    its name. The caller decides, since which folders are classes depends on the dataset's layout.
    """
    shutil.rmtree(folder / "__MACOSX", ignore_errors=True)
    entries = list(folder.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return folder
    top = entries[0]
    return folder if is_content(top) else top


def build_atomically(dest: Path, fill: Callable[[Path], None],
                     installed: Callable[[Path], Path] = lambda temp: temp) -> Path:
    """Let `fill` populate a temp folder next to `dest`, then rename `installed(temp)` (by default the temp
    folder itself) to `dest`.

    On any failure the temp folder is removed, so `dest` either appears complete or not at all.
    """
    if dest.exists():
        raise DataError(f"{dest}: already exists; remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        fill(temp)
        source = installed(temp)
        if source == temp and not any(temp.iterdir()):
            raise DataError(f"{dest}: nothing to install (empty archive or folder)")
        os.rename(source, dest)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return dest


def extract_archive(archive: Path, dest: Path, is_content: Callable[[Path], bool] = _never) -> Path:
    """Safely extract a zip/tar archive to `dest` (which must not exist), stripping a single top folder as a
    wrapper unless `is_content(folder)` says it is data, such as a class folder (see `_single_top`)."""
    kind = archive_kind(archive)
    extract = _extract_zip if kind == "zip" else _extract_tar

    def fill(temp: Path) -> None:
        with tqdm(total=archive.stat().st_size, unit="B", unit_scale=True, desc=f"extract {archive.name}") as bar:
            try:
                extract(archive, temp, bar)
            except _CORRUPT as exc:
                raise DataError(f"{archive}: corrupt or truncated {kind} archive ({exc})") from None
            except OSError as exc:
                raise DataError(f"{archive}: extraction failed ({exc})") from None

    return build_atomically(dest, fill, lambda temp: _single_top(temp, is_content))
