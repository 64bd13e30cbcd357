"""The `moeclip` command line."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from moeclip.bench.data_cli import data_app
from moeclip.bench.stages.cli import CONFIG_OPTION, PROFILE_OPTION, reporting_user_errors, stage_app

app = typer.Typer(help="MoECLIP zero-shot anomaly detection benchmark.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")


def run() -> None:
    """Console entry point: user-fixable errors become one message and exit status 2."""
    reporting_user_errors(app)


@app.callback()
def main() -> None:
    """MoECLIP zero-shot anomaly detection benchmark."""




@app.command()
def params(
    backbone: str = typer.Option("ViT-L-14-336", help="open_clip model name (MoECLIP; a baseline uses its profile's)"),
    image_size: int = typer.Option(518, help="input size in pixels (MoECLIP; a baseline uses its profile's)"),
    method: str = typer.Option("moeclip", help="moeclip, or a baseline of params.yaml's `methods`"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    config: Path = CONFIG_OPTION,
    profile: str = typer.Option("paper", help="the profile whose model settings the count uses"),
) -> None:
    """Count parameters of a method: total, trainable, backbone, added (no weights needed)."""
    if method == "moeclip":
        from moeclip.backbone import default_moe_layers
        from moeclip.bench.params import load_profile
        from moeclip.config import ModelConfig

        settings = load_profile(config, profile).model.model_dump()
        counted = ModelConfig.model_validate({**settings, "backbone": backbone, "image_size": image_size,
                                              "weights": None, "moe_layers": default_moe_layers(backbone)})
    else:
        from moeclip.bench.baselines import method_runs
        from moeclip.bench.experiments import load_plan

        counted = method_runs(*load_plan(config, profile), method)[0].model
        backbone, image_size = counted.backbone, counted.image_size
    from moeclip.methods.registry import method_of

    counts = method_of(counted).count_parameters(counted)
    if as_json:
        typer.echo(json.dumps(counts))
        return
    table = Table(title=f"{method} on {backbone} at {image_size}px")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for name, value in counts.items():
        table.add_row(name, f"{value:,}")
    Console().print(table)


def _profile(config: Path, profile: str | None):
    """A profile for a command that computes: its runtime pins (threads, kernels) are applied."""
    from moeclip.bench.params import load_profile
    from moeclip.runtime import pin_runtime

    loaded = load_profile(config, profile)
    pin_runtime(loaded.runtime.threads, loaded.runtime.deterministic)
    return loaded


def _summary_table(title: str, summaries: dict[str, pd.DataFrame]) -> Table:
    """Datasets as rows, one column per (run, metric); '-' where a metric does not apply."""
    joined = pd.concat(summaries, axis=1)
    table = Table(title=title)
    table.add_column("dataset")
    for run, metric in joined.columns:
        level, name = metric.split("_", 1)
        table.add_column(f"{run}\n{level} {name.replace('_', '-').upper()}", justify="right")
    for dataset, row in joined.iterrows():
        table.add_row(str(dataset), *("-" if pd.isna(v) else f"{v:.1f}" for v in row))
    return table


@app.command()
def train(
    config: Path = CONFIG_OPTION,
    profile: str | None = PROFILE_OPTION,
    on: list[str] | None = typer.Option(None, help="auxiliary dataset(s) to train on; repeat for several "
                                                   "(default: params.yaml's main.auxiliary)"),
    out: Path | None = typer.Option(None, help="run folder (default: <runs>/<profile>/train/<datasets>)"),
    max_steps: int | None = typer.Option(None, help="stop (checkpointed) after this many steps; rerun to resume"),
) -> None:
    """Train MoECLIP on auxiliary dataset(s) with a profile's settings and calibrate it once finished; resumes
    from the run folder's checkpoint, and keeps a finished training made with the same settings and code."""
    from moeclip.bench.experiments import load_plan, main_run
    from moeclip.bench.layout import checkpoint_in
    from moeclip.bench.stages.trained import train_and_calibrate

    benchmark, settings = load_plan(config, profile)
    run = main_run(settings, *(on or [benchmark.main.auxiliary]))
    checkpoint = checkpoint_in(out or settings.layout.training(run.name))
    typer.echo(str(train_and_calibrate(settings, run, checkpoint, max_steps=max_steps)))


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="a checkpoint written by `moeclip train`"),
    manifest: list[Path] = typer.Option(..., help="manifest(s) to evaluate on; repeat for several"),
    out: Path = typer.Option(..., help="folder for per_class.csv/.parquet and summary.json"),
    config: Path = CONFIG_OPTION,
    profile: str | None = PROFILE_OPTION,
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: the profile's)"),
    experiment: str | None = typer.Option(None, help="MLflow experiment (default: the profile's)"),
    device: str | None = typer.Option(None, help="cpu, cuda, auto (default: the profile's)"),
    batch_size: int | None = typer.Option(None, min=1, help="images per pass (default: the profile's)"),
) -> None:
    """Zero-shot evaluation: per-class and per-dataset AUROC/AP (x100), logged to MLflow."""
    from moeclip.bench.workflows import evaluate_checkpoint

    settings = _profile(config, profile)
    tracking = settings.tracking.model_copy(update={key: value for key, value in
                                                    {"uri": tracking_uri, "experiment": experiment}.items() if value})
    manifests = {path.stem: path for path in manifest}
    summary = evaluate_checkpoint(checkpoint, manifests, out, tracking, device or settings.device,
                                  batch_size or settings.runtime.eval_batch_size)
    Console().print(_summary_table(f"{checkpoint} (x100)", {"": summary}))


@app.command()
def predict(
    inputs: list[str] = typer.Argument(..., help="image files, folders (searched recursively) or glob patterns "
                                                 "('parts/**/*.png'), all of one kind of object or scan",
                                       show_default=False),
    checkpoint: Path = typer.Option(..., help="a calibrated checkpoint: runs/<profile>/train/<dataset>/checkpoint.pt "
                                              "or one of `moeclip train`"),
    class_name: str = typer.Option(..., help="what the images show, e.g. 'metal nut' (in the prompts)"),
    description: str | None = typer.Option(None, help="the prompts' words for it (default: the class name)"),
    domain: str = typer.Option("industrial", help="industrial or medical: the blur and the score rule"),
    out: Path = typer.Option(Path("predictions"), help="folder for overlays, masks, results.csv/.json"),
    batch_size: int = typer.Option(8, min=1, help="images per forward pass"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, auto"),
    masks: bool = typer.Option(False, "--masks", help="also write each map thresholded, as a black/white PNG"),
    threshold: float | None = typer.Option(None, help="label images at or above this score anomalous "
                                                      "(default: the checkpoint's F1-best threshold)"),
) -> None:
    """Anomaly scores, labels and map overlays for your own images, each scored alone on the checkpoint's
    calibrated 0-1 scale (see docs/own-images.md)."""
    from moeclip.inference import run_prediction

    results = run_prediction(inputs, checkpoint, description or class_name, domain, out, batch_size, device, masks,
                             threshold)
    anomalous = int((results["label"] == "anomalous").sum())
    typer.echo(f"{len(results)} images, {anomalous} anomalous; overlays and results.csv in {out}")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="a calibrated checkpoint"),
    class_name: str = typer.Option(..., help="the kind of object the exported model detects anomalies on"),
    domain: str = typer.Option("industrial", help="industrial or medical: the blur and the score rule"),
    export_format: str = typer.Option("onnx", "--format", help="onnx (the only one: see moeclip/export.py)"),
    out: Path = typer.Option(Path("moeclip.onnx"), help="the file to write"),
) -> None:
    """The inference path (images -> calibrated maps and scores, one class) as a standalone ONNX model."""
    from moeclip.export import export_onnx

    if export_format != "onnx":
        raise typer.BadParameter(f"--format {export_format!r}: only onnx is supported")
    if domain not in ("industrial", "medical"):
        raise typer.BadParameter("--domain must be industrial or medical")
    typer.echo(f"wrote {export_onnx(checkpoint, class_name, domain, out)}")


@app.command()
def calibrate(
    checkpoint: Path = typer.Argument(..., help="the checkpoint to calibrate (changed in place)"),
    manifest: list[Path] = typer.Option(..., help="manifest(s) of the data it was trained on; repeat for several"),
    config: Path = CONFIG_OPTION,
    profile: str | None = PROFILE_OPTION,
    device: str | None = typer.Option(None, help="cpu, cuda, auto (default: the profile's)"),
) -> None:
    """Store in a checkpoint the fixed scale of its scores and log it to MLflow as a servable model (trainings
    of the pipeline and of `moeclip train` have both already)."""
    from moeclip.bench.workflows import calibrate_checkpoint

    settings = _profile(config, profile)
    uri = calibrate_checkpoint(checkpoint, {path.stem: path for path in manifest}, settings.tracking,
                               device or settings.device, settings.runtime.eval_batch_size,
                               f"model/{checkpoint.parent.name}")
    typer.echo(f"calibrated {checkpoint}; serve it with: MLFLOW_TRACKING_URI={settings.tracking.uri} "
               f"mlflow models serve -m {uri} --env-manager local")


@app.command()
def demo(
    config: Path = CONFIG_OPTION,
    profile: str = typer.Option("demo", help="an offline profile of the params file"),
) -> None:
    """Quick before/after check: evaluate the untrained model, train on VisA, evaluate again (unseen datasets).

    The demo backbone is a tiny random-weight ViT, so the numbers show that the pipeline works
    and that training helps; they are not the paper's results. `dvc repro` runs the full benchmark.
    """
    from moeclip.bench.experiments import load_plan, main_run
    from moeclip.bench.layout import checkpoint_in
    from moeclip.bench.stages.trained import train_and_calibrate
    from moeclip.bench.workflows import evaluate_checkpoint, prepare_profile_data, untrained_checkpoint
    from moeclip.runtime import pin_runtime

    benchmark, settings = load_plan(config, profile)
    pin_runtime(settings.runtime.threads, settings.runtime.deterministic)
    auxiliary = benchmark.main.auxiliary
    manifests = prepare_profile_data(settings, [auxiliary, *benchmark.main.targets[auxiliary]])
    targets = {name: manifests[name] for name in benchmark.main.targets[auxiliary]}
    run_dir = settings.layout.before_after()
    before = evaluate_checkpoint(untrained_checkpoint(settings.model, settings.train.seed, run_dir / "untrained.pt"),
                                 targets, run_dir / "eval-untrained", settings.tracking, settings.device,
                                 settings.runtime.eval_batch_size)
    trained = train_and_calibrate(settings, main_run(settings, auxiliary), checkpoint_in(run_dir / "train"))
    after = evaluate_checkpoint(trained, targets,
                                run_dir / "eval-trained", settings.tracking, settings.device,
                                settings.runtime.eval_batch_size)
    columns = ["image_auroc", "pixel_auroc", "pixel_ap"]
    Console().print(_summary_table(
        f"Demo ({profile}): zero-shot on unseen datasets, x100 (tiny random-weight ViT; not paper results)",
        {"untrained": before.reindex(columns=columns), "trained": after.reindex(columns=columns)}))
    Console().print(f"results in {run_dir}; browse runs with: mlflow ui --backend-store-uri {settings.tracking.uri}")


@app.command()
def report(
    config: Path = CONFIG_OPTION,
    profile: str | None = PROFILE_OPTION,
) -> None:
    """Render every table (Markdown + LaTeX, ours beside the paper's) and figure from the pipeline's metrics."""
    from moeclip.bench.stages.report import run as render

    typer.echo(f"tables and figures in {render(config, profile)}")


@app.command()
def plan(
    config: Path = CONFIG_OPTION,
    profile: str = typer.Option("paper", help="the profile to plan (default the paper's)"),
    gpus: list[int] = typer.Option([1, 2, 4, 8, 16, 32], help="GPU counts to simulate (repeat the option)"),
    units: bool = typer.Option(False, help="also list every unit with its estimated time"),
) -> None:
    """Estimate the plan's time on N GPUs: its units, their cost on one H100, the critical path, and the
    makespan and GPU-hours of the flow's scheduling simulated for each GPU count."""
    from moeclip.bench.experiments import load_plan
    from moeclip.bench.planning import planned_units
    from moeclip.bench.schedule import format_table

    benchmark, chosen = load_plan(config, profile)
    planned = planned_units(benchmark, chosen)
    if units:
        table = Table("unit", "GPU", "estimate (h)", title=f"Units of profile {chosen.name}")
        for unit in planned:
            table.add_row(unit.name, "yes" if unit.gpu else "", f"{unit.seconds / 3600:.3f}")
        Console(width=160).print(table)
    gpu_units = [unit for unit in planned if unit.gpu]
    typer.echo(f"profile {chosen.name}: {len(planned)} units, {len(gpu_units)} on a GPU "
               f"({sum(unit.seconds for unit in gpu_units) / 3600:.1f} GPU-hours at the release's H100 speed)\n")
    typer.echo(format_table(planned, gpus))


@app.command("dvc-yaml")
def dvc_yaml(
    config: Path = CONFIG_OPTION,
    out: Path = typer.Option(Path("dvc.yaml"), help="the file to write"),
    check: bool = typer.Option(False, help="only say whether OUT is current (exit status 1 if not)"),
) -> None:
    """Render dvc.yaml from the stage declarations (moeclip/bench/stages/) and the params file's plan."""
    from moeclip.atomic import write_text_atomically
    from moeclip.bench.dvcfile import render
    from moeclip.bench.experiments import load_plan

    text = render(load_plan(config)[0])
    if check:
        if not out.is_file() or out.read_text() != text:
            typer.echo(f"{out} is not what the stage declarations render: run `moeclip dvc-yaml`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out} is current")
        return
    write_text_atomically(out, text)
    typer.echo(f"wrote {out}")


app.add_typer(stage_app, name="stage")
