"""`moeclip data ...`: fetch, prepare, list and generate the benchmark datasets."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.table import Table

from moeclip.data.fetch import fetch_dataset
from moeclip.data.layouts import layout_shapes
from moeclip.data.prepare import prepare_dataset
from moeclip.data.registry import DATASETS, DataError

data_app = typer.Typer(help="Fetch, prepare and list the benchmark datasets.", no_args_is_help=True)


@contextmanager
def _reported() -> Iterator[None]:
    """Expected data errors become one message on stderr and exit code 1, without a traceback."""
    try:
        yield
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="Registry name (see `moeclip data list`) or your own name."),
    url: str | None = typer.Option(None, help="http(s) URL, gdrive:<id>, Drive URL or local path."),
    sha256: str | None = typer.Option(None, help="Expected sha256 of the archive."),
    archive: Path | None = typer.Option(None, help="Local archive file or extracted folder."),
    dest: Path = typer.Option(Path("data/raw"), help="Folder that receives <dest>/<name>/."),
    link: bool = typer.Option(False, help="Symlink a local folder instead of copying it."),
) -> None:
    """Download (or take from disk) a dataset and extract it safely to DEST/NAME."""
    with _reported():
        path = fetch_dataset(name, dest, url=url, sha256=sha256, archive=archive, link=link)
    typer.echo(str(path))


@data_app.command("prepare")
def prepare(
    name: str = typer.Argument(..., help="Registry name, layout name, or your own name with --layout."),
    root: Path = typer.Option(..., help="The extracted dataset folder."),
    out: Path = typer.Option(..., help="Manifest file to write (.parquet)."),
    layout: str | None = typer.Option(None, help="Folder layout; defaults to the registry's. Layouts: " + " | ".join(
        f"{name} = {shape.rstrip('.')}" for name, shape in layout_shapes().items())),
    domain: str | None = typer.Option(None, help="industrial or medical (custom data; default industrial)."),
    split: list[str] = typer.Option(["test"], help="Splits to keep; repeat for several."),
) -> None:
    """Validate every image and mask of a dataset folder and write its manifest."""
    with _reported():
        frame = prepare_dataset(name, root, out, layout, domain=domain, splits=tuple(split))
    typer.echo(f"{out}: {len(frame)} images")


@data_app.command("list")
def list_datasets() -> None:
    """Show the dataset registry."""
    table = Table(title="MoECLIP datasets")
    for header in ("name", "dataset", "domain", "classes", "normal", "anomalous", "pixel", "image", "layout", "source"):
        table.add_column(header)
    for spec in DATASETS.values():
        table.add_row(
            spec.name, spec.display_name, spec.domain, str(len(spec.classes)), str(spec.expected_normal),
            str(spec.expected_anomalous), "yes" if spec.pixel_metrics else "no", "yes" if spec.image_metrics else "no",
            spec.layout, "manual" if spec.source.manual else str(spec.source.url),
        )
    Console().print(table)


@data_app.command("demo")
def demo(
    out: Path = typer.Option(..., help="Folder for the synthetic demo datasets."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Generate the small synthetic datasets used by the offline demo."""
    from moeclip.data.synthetic import generate_demo_datasets  # imported lazily: pulls in image synthesis

    with _reported():
        paths = generate_demo_datasets(out, seed=seed)
    for path in paths:
        typer.echo(str(path))
