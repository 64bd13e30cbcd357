"""The `moeclip` command line."""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from moeclip.errors import MoeclipError


app = typer.Typer(help="MoECLIP zero-shot anomaly detection benchmark.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def run() -> None:
    """Console entry point: user-fixable errors become one message and exit status 2."""
    try:
        app()
    except MoeclipError as err:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise SystemExit(2) from None


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
