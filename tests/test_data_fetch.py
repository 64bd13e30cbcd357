"""Fetching: loopback HTTP downloads, resume, checksums, safe extraction, atomic failure, CLI errors."""
from __future__ import annotations

import io
import socket
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from moeclip.bench.cli import app
from moeclip.data.archive import file_sha256, member_problem
from moeclip.data.fetch import fetch_dataset, http_download
from moeclip.data.layouts import parse_layout
from moeclip.data.manifest import read_manifest
from moeclip.data.registry import DataError

runner = CliRunner()


def _pack(source: Path, archive: Path, top: str = "release") -> Path:
    """Archive `source` under one top-level folder `top` (which fetch must strip)."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as handle:
            for path in files:
                handle.write(path, f"{top}/{path.relative_to(source).as_posix()}")
    else:
        mode = {"gz": "w:gz", "xz": "w:xz", "tar": "w"}[archive.name.rsplit(".", 1)[1]]
        with tarfile.open(archive, mode) as handle:
            handle.add(source, arcname=top)
    return archive


def _tiny_tree(root: Path, make_image: Callable[..., Path], files: tuple[str, ...]) -> Path:
    """Tiny PNGs at the given paths under `root` (only the names matter to fetch and the layout parsers)."""
    for name in files:
        make_image(root / name)
    return root


def _evil_archive(path: Path, member: str, link: str | None = None) -> Path:
    """A tar.gz (or zip) holding one harmless file and one unsafe member."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as handle:
            handle.writestr("ok/readme.txt", "fine")
            handle.writestr(zipfile.ZipInfo(member), "evil")
        return path
    with tarfile.open(path, "w:gz") as handle:
        for name, target in (("ok/readme.txt", None), (member, link)):
            info = tarfile.TarInfo(name)
            data = b"" if target else b"evil"
            if target:
                info.type, info.linkname = tarfile.SYMTYPE, target
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def dataset_source(tmp_path: Path, mvtec_tree: Callable[[Path], Path]) -> Path:
    return mvtec_tree(tmp_path / "source")


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tar.xz"])
def test_download_extract_prepare(tmp_path: Path, http_folder, dataset_source: Path, suffix: str) -> None:
    archive = _pack(dataset_source, http_folder.folder / f"mvtec{suffix}")
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["data", "fetch", "mvtec", "--url", http_folder.url(archive.name),
                                 "--sha256", file_sha256(archive), "--dest", str(raw)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in raw.iterdir()) == ["mvtec"]  # no download or temp folder left
    assert (raw / "mvtec" / "bottle" / "test" / "good" / "000.png").is_file()  # top folder stripped

    out = tmp_path / "manifests" / "mvtec.parquet"
    result = runner.invoke(app, ["data", "prepare", "mvtec", "--root", str(raw / "mvtec"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = read_manifest(out)
    assert len(frame) == 6 and frame["label"].sum() == 2
    assert set(frame["class_name"]) == {"bottle", "screw"}
    assert frame["mask_path"].notna().sum() == 2


def _evil_cases(served: Path) -> dict[str, tuple[Path, str]]:
    return {
        "traversal_tar": (_evil_archive(served / "t.tar.gz", "../evil.txt"), "path traversal"),
        "traversal_zip": (_evil_archive(served / "t.zip", "ok/../../evil.txt"), "path traversal"),
        "absolute_tar": (_evil_archive(served / "a.tar.gz", "/tmp/evil.txt"), "absolute path"),
        "absolute_zip": (_evil_archive(served / "a.zip", "/tmp/evil.txt"), "absolute path"),
        "symlink_out": (_evil_archive(served / "s.tar.gz", "ok/link", "../../../etc/passwd"), "outside the archive"),
    }


@pytest.mark.parametrize("case", ["wrong_sha", "truncated_zip", "truncated_tar", "traversal_tar", "traversal_zip",
                                  "absolute_tar", "absolute_zip", "symlink_out"])
def test_bad_archives_fail_cleanly(tmp_path: Path, http_folder, dataset_source: Path, case: str) -> None:
    served = http_folder.folder
    args: list[str] = []
    if case == "wrong_sha":
        archive, expected = _pack(dataset_source, served / "good.zip"), "sha256 mismatch"
        args = ["--sha256", "0" * 64]
    elif case.startswith("truncated"):
        whole = _pack(dataset_source, served / ("w.zip" if case.endswith("zip") else "w.tar.gz"))
        archive = served / f"cut-{whole.name}"
        archive.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        expected = "corrupt or truncated"
    else:
        archive, expected = _evil_cases(served)[case]
    raw = tmp_path / "raw"
    raw.mkdir()
    result = runner.invoke(app, ["data", "fetch", "mvtec", "--url", http_folder.url(archive.name),
                                 "--dest", str(raw), *args])
    assert result.exit_code == 1
    assert expected in result.output and http_folder.url(archive.name) in result.output
    assert "Traceback" not in result.output
    assert list(raw.iterdir()) == []  # no dataset, temp folder or download left behind
    assert not (tmp_path / "evil.txt").exists()


def test_unsafe_local_archive_names_the_file(tmp_path: Path) -> None:
    archive = _evil_archive(tmp_path / "evil.tar.gz", "../evil.txt")
    with pytest.raises(DataError, match=r"evil\.tar\.gz: unsafe member '\.\./evil\.txt': path traversal"):
        fetch_dataset("custom", tmp_path / "raw", archive=archive)
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize(
    ("name", "link", "hardlink", "problem"),
    [
        ("a/b.png", None, False, None),
        ("C:/x", None, False, "absolute path"),
        ("a\\..\\..\\x", None, False, "path traversal"),
        ("a/link", "../b.png", False, None),
        ("a/link", "../../b.png", False, "outside"),
        ("a/hard", "a/b.png", True, None),
        ("a/hard", "../b.png", True, "outside"),
    ],
)
def test_member_problem(name: str, link: str | None, hardlink: bool, problem: str | None) -> None:
    found = member_problem(name, link, hardlink)
    assert found == problem if problem is None else problem in found


def test_resume_partial_download(tmp_path: Path, http_folder) -> None:
    payload = bytes(range(256)) * 400
    (http_folder.folder / "blob.bin").write_bytes(payload)
    target = tmp_path / "blob.bin"
    target.with_name("blob.bin.part").write_bytes(payload[:1000])
    http_download(http_folder.url("blob.bin"), target)
    assert target.read_bytes() == payload
    assert http_folder.ranges == ["bytes=1000-"]
    assert not target.with_name("blob.bin.part").exists()


def test_unreachable_network_names_dataset_and_place(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as error:
        fetch_dataset("kvasir", raw, url=f"http://127.0.0.1:{port}/kvasir.zip")
    message = str(error.value)
    assert "could not download" in message and str(raw / "kvasir.zip") in message and str(raw / "kvasir") in message


def test_manual_dataset_explains_where_to_put_it(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "fetch", "mvtec", "--dest", str(tmp_path)])
    assert result.exit_code == 1
    assert "mvtec.com" in result.output and str(tmp_path / "mvtec.zip") in result.output
    assert list(tmp_path.iterdir()) == []


def test_dropped_archive_and_local_folders(tmp_path: Path, dataset_source: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    _pack(dataset_source, raw / "mvtec.tar.gz")
    assert (fetch_dataset("mvtec", raw) / "screw" / "test" / "crack" / "000.png").is_file()
    assert (raw / "mvtec.tar.gz").is_file()  # the user's archive is kept
    copied = fetch_dataset("mine", raw, archive=dataset_source)
    assert (copied / "bottle").is_dir() and not copied.is_symlink()
    linked = fetch_dataset("linked", raw, url=str(dataset_source), link=True)
    assert linked.is_symlink() and (linked / "bottle").is_dir()
    assert fetch_dataset("mvtec", raw) == raw / "mvtec"  # already there: returned as is
    with pytest.raises(DataError, match="already exists"):
        fetch_dataset("mvtec", raw, archive=raw / "mvtec.tar.gz")


def test_tar_with_internal_links(tmp_path: Path, dataset_source: Path) -> None:
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(dataset_source / "bottle", arcname="data/bottle")
        for name, kind, target in (("data/hard.png", tarfile.LNKTYPE, "data/bottle/test/good/000.png"),
                                   ("data/soft.png", tarfile.SYMTYPE, "bottle/test/good/001.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            handle.addfile(info)
    dest = fetch_dataset("linked", tmp_path / "raw", archive=archive)
    assert (dest / "hard.png").read_bytes() == (dest / "bottle" / "test" / "good" / "000.png").read_bytes()
    assert (dest / "soft.png").is_symlink() and (dest / "soft.png").is_file()


def test_google_drive_ids_go_through_gdown(tmp_path: Path, dataset_source: Path, monkeypatch) -> None:
    gdown = pytest.importorskip("gdown")
    packed = _pack(dataset_source, tmp_path / "drive.zip")
    calls: list[dict] = []

    def fake_download(**kwargs: object) -> str:
        calls.append(kwargs)
        Path(str(kwargs["output"])).write_bytes(packed.read_bytes())
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", fake_download)
    dest = fetch_dataset("drive", tmp_path / "raw", url="gdrive:FILEID123")
    assert (dest / "screw" / "test" / "crack" / "000.png").is_file()
    assert calls[0]["id"] == "FILEID123" and calls[0]["resume"] is True
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["drive"]


def test_a_single_class_archive_of_your_own_keeps_its_class(tmp_path: Path, dataset_source: Path) -> None:
    """`bottle/test/good/...` alone in an archive is the class folder, not a wrapper to strip."""
    archive = _pack(dataset_source / "bottle", tmp_path / "bottle.zip", top="bottle")
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["data", "fetch", "parts", "--archive", str(archive), "--dest", str(raw)])
    assert result.exit_code == 0, result.output
    assert (raw / "parts" / "bottle" / "test" / "good" / "000.png").is_file()
    out = tmp_path / "parts.parquet"
    result = runner.invoke(app, ["data", "prepare", "parts", "--layout", "mvtec", "--root", str(raw / "parts"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(read_manifest(out)["class_name"]) == {"bottle"}
    wrapped = _pack(dataset_source, tmp_path / "wrapped.tar.gz", top="release")  # a wrapper is still stripped
    assert fetch_dataset("mine", raw, archive=wrapped) == raw / "mine"
    assert sorted(p.name for p in (raw / "mine").iterdir()) == ["bottle", "screw"]


@pytest.mark.parametrize("layout", ["mvtec", "folders"])
def test_a_tree_that_starts_with_a_split_folder_is_refused_by_name(tmp_path: Path, dataset_source: Path,
                                                                   layout: str) -> None:
    archive = _pack(dataset_source / "bottle" / "test", tmp_path / "split.zip", top="test")
    raw = fetch_dataset("parts", tmp_path / "raw", archive=archive)
    assert (raw / "test" / "good" / "000.png").is_file()  # kept: stripping it would leave good/ and crack/
    result = runner.invoke(app, ["data", "prepare", "parts", "--layout", layout, "--root", str(raw),
                                 "--out", str(tmp_path / "parts.parquet")])
    assert result.exit_code == 1 and not (tmp_path / "parts.parquet").exists()
    assert "starts with a split folder" in result.output and "<class name>" in result.output


def test_the_layout_option_lists_every_layout_with_its_folders() -> None:
    from moeclip.data.layouts import LAYOUTS

    help_text = " ".join(runner.invoke(app, ["data", "prepare", "--help"], terminal_width=400).output.split())
    for name in LAYOUTS:
        assert f"{name} = " in help_text
    assert "<class>/good/*" in help_text and "<class>/test/good/*" in help_text


_BOTTLE = ("bottle/test/good/000.png", "bottle/test/broken/000.png", "bottle/ground_truth/broken/000_mask.png",
           "bottle/train/good/000.png")
_CANDLE = ("candle/Data/Images/Normal/000.JPG", "candle/Data/Images/Anomaly/000.JPG",
           "candle/Data/Masks/Anomaly/000.png")


@pytest.mark.filterwarnings("ignore:.*split_csv")  # a lone VisA class has no split table: every image is test
@pytest.mark.parametrize(("name", "files"), [("mvtec", _BOTTLE), ("visa", _CANDLE)])
def test_a_single_class_registry_archive_keeps_its_class(tmp_path: Path, http_folder, make_image,
                                                         name: str, files: tuple[str, ...]) -> None:
    """MVTec AD is also sold per class (`bottle.tar.xz` holding `bottle/test/...`): that folder is the class."""
    class_name = files[0].split("/")[0]
    source = _tiny_tree(tmp_path / "source", make_image, files)
    archive = _pack(source / class_name, http_folder.folder / f"{class_name}.tar.xz", top=class_name)
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["data", "fetch", name, "--url", http_folder.url(archive.name), "--dest", str(raw)])
    assert result.exit_code == 0, result.output
    assert (raw / name / files[0]).is_file()
    parsed = parse_layout(name, raw / name)
    assert parsed.classes == [class_name] and {s.class_name for s in parsed.samples} == {class_name}
    assert [s.mask is not None for s in parsed.samples if s.label] == [True]


@pytest.mark.parametrize(("name", "top", "files", "landed"), [
    ("mvtec", "mvtec_anomaly_detection", ("bottle/test/good/000.png", "cable/test/good/000.png"), ["bottle", "cable"]),
    ("rsdd", "Metal15", ("test/good/000.png", "test/anomaly/000.png", "ground_truth/anomaly/000.png"),
     ["ground_truth", "test"]),
    ("headct", "headct", ("test/good/000.png", "test/defect/000.png"), ["test"]),
])
def test_a_wrapper_folder_of_a_registry_archive_is_stripped(tmp_path: Path, make_image, name: str, top: str,
                                                            files: tuple[str, ...], landed: list[str]) -> None:
    """A full archive's wrapper folder, and the lone folder of a classless dataset, is still stripped (as it was
    before single-class archives kept theirs): each layout's parser expects what is left at the dataset root."""
    source = _tiny_tree(tmp_path / "source", make_image, files)
    dest = fetch_dataset(name, tmp_path / "raw", archive=_pack(source, tmp_path / f"{name}.tar.gz", top=top))
    assert sorted(p.name for p in dest.iterdir()) == landed
    assert all((dest / path).is_file() for path in files)
