"""Shared fixtures for the data-layer tests (tiny images, a loopback HTTP server with Range support) and collection rules."""
from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

ImageMaker = Callable[..., Path]

# The checks against the MoECLIP paper's text need that file, which may not be redistributed with the
# repository: they are collected only where MOECLIP_PAPER_TEXT names it (.ci/run does), so a fresh
# clone's suite passes without it.
collect_ignore = [] if os.environ.get("MOECLIP_PAPER_TEXT") else ["test_paper_results.py"]


def _write_image(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", value: int = 128) -> Path:
    """A tiny solid image (a mask when value > 0 and mode 'L'); parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode in ("L", "P", "1") else (value,) * len(mode)).save(path)
    return path


@pytest.fixture
def make_image() -> ImageMaker:
    return _write_image


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from `directory`, honouring `Range: bytes=N-` (206) like real download servers."""

    ranges: list[str | None]

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        requested = self.headers.get("Range")
        self.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").split("-")[0]) if requested else 0
        if start >= len(data) and requested:
            self.send_error(416)
            return
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args: object) -> None:
        """Keep test output quiet."""


class Served:
    """A folder published on 127.0.0.1; `ranges` records each request's Range header."""

    def __init__(self, folder: Path, base_url: str, ranges: list[str | None]) -> None:
        self.folder, self.base_url, self.ranges = folder, base_url, ranges

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[Served]:
    folder = tmp_path / "served"
    folder.mkdir()
    ranges: list[str | None] = []
    handler = type("Handler", (_RangeHandler,), {"ranges": ranges})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Served(folder, f"http://127.0.0.1:{server.server_address[1]}", ranges)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mvtec_tree(make_image: ImageMaker) -> Callable[[Path], Path]:
    """Builds a tiny MVTec-AD tree (bottle, screw): per class 2 normal + 1 anomalous test image, 1 train image."""

    def build(root: Path) -> Path:
        for name in ("bottle", "screw"):
            make_image(root / name / "train" / "good" / "000.png")
            make_image(root / name / "test" / "good" / "000.png")
            make_image(root / name / "test" / "good" / "001.png")
            make_image(root / name / "test" / "crack" / "000.png")
            make_image(root / name / "ground_truth" / "crack" / "000_mask.png", mode="L", value=255)
        return root

    return build
