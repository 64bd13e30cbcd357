"""The `moeclip` command line."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from moeclip.errors import MoeclipError

from moeclip.data.cli import data_app

app = typer.Typer(help="MoECLIP zero-shot anomaly detection benchmark.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def run() -> None:
    """Console entry point: user-fixable errors become one message and exit status 2."""
    try:
        app()
    except MoeclipError as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise SystemExit(2) from None
app.add_typer(data_app, name="data")


@app.callback()
def main() -> None:
    """MoECLIP zero-shot anomaly detection benchmark."""


@app.command()
def params(
    backbone: str = typer.Option("ViT-L-14-336", help="open_clip model name"),
    image_size: int = typer.Option(518, help="input size in pixels"),
    random_init: bool = typer.Option(False, "--random-init", help="random weights (nothing is downloaded)"),
    weights: str = typer.Option("openai", help="open_clip tag or checkpoint path (ignored with --random-init)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Count parameters of MoECLIP on a backbone: total, trainable, backbone, added."""
    from moeclip.backbone import default_moe_layers
    from moeclip.config import ModelConfig
    from moeclip.model import build_model

    config = ModelConfig(backbone=backbone, image_size=image_size, weights=None if random_init else weights,
                         moe_layers=default_moe_layers(backbone))
    counts = build_model(config).parameter_counts()
    if as_json:
        typer.echo(json.dumps(counts))
        return
    table = Table(title=f"MoECLIP on {backbone} at {image_size}px")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for name, value in counts.items():
        table.add_row(name, f"{value:,}")
    Console().print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("data/demo"), help="where the synthetic datasets, manifests and results go"),
    seed: int = typer.Option(0, help="seed of the data generator and of the model's initialisation"),
    batch_size: int = typer.Option(8, min=1),
) -> None:
    """Offline demo: synthetic datasets -> validated manifests -> zero-shot evaluation of the tiny model.

    The backbone is a tiny random-weight ViT, so the numbers only show that the pipeline
    runs end to end; they are not the paper's results.
    """
    from moeclip.config import ModelConfig
    from moeclip.data.manifest import read_manifest
    from moeclip.data.prepare import prepare_dataset
    from moeclip.data.synthetic import generate_demo_datasets
    from moeclip.evaluation import evaluate_frame, summarize
    from moeclip.model import build_model

    console = Console()
    frames = []
    for root in generate_demo_datasets(out / "raw", seed=seed):
        manifest = out / "manifests" / f"{root.name}.parquet"
        prepare_dataset(root.name, root, manifest, console=console)
        frames.append(read_manifest(manifest))
    model = build_model(ModelConfig.tiny(), seed=seed)
    per_class = evaluate_frame(model, pd.concat(frames, ignore_index=True), batch_size=batch_size)
    per_class.to_csv(out / "per_class.csv", index=False)
    summary = summarize(per_class)
    table = Table(title="Demo: tiny random-weight MoECLIP, untrained (x100; not paper results)")
    table.add_column("dataset")
    for column in summary.columns:
        level, metric = column.split("_", 1)
        table.add_column(f"{level} {metric.replace('_', '-').upper()}", justify="right")
    for dataset, row in summary.iterrows():
        table.add_row(str(dataset), *("-" if pd.isna(v) else f"{v:.1f}" for v in row))
    console.print(table)
    console.print(f"per-class results: {out / 'per_class.csv'}")
