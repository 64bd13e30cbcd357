"""`moeclip report`: every table and figure of the paper, regenerated from the pipeline's metric files.

Inputs are only what the DVC stages write (and log to MLflow): the main evaluations'
summary.json, each experiment's metrics.json and the analysis files. Each table goes to
`<reports>/<profile>/<table>.md` and `.tex`, figures to PNG, and README.md collects them all.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moeclip.atomic import write_text_atomically
from moeclip.bench.experiments import Benchmark, experiment_runs, selected_variants
from moeclip.bench.params import Profile
from moeclip.bench.reports.paper import load_other_results, load_paper_results, paper_table
from moeclip.bench.reports.tables import (
    Cell,
    Comparison,
    MethodColumn,
    MethodTable,
    fmt,
    method_latex,
    method_markdown,
    variant_latex,
    variant_markdown,
)
from moeclip.data.registry import DATASETS
from moeclip.errors import MoeclipError
from moeclip.figures import save_figure

TABLE1_METRICS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap"]
Values = dict[str, dict[str, float | None]]  # dataset -> metric -> value


def _stage_output(path: Path) -> Path:
    """`path`, which a pipeline stage writes; a clear error when that stage has not run."""
    if not path.is_file():
        raise MoeclipError(f"'{path}' is missing: run the pipeline (`dvc repro`) before `moeclip report`")
    return path


def _read_json(path: Path) -> Any:
    return json.loads(_stage_output(path).read_text())


def _with_averages(values: Values, cells: list[tuple[str, str]]) -> dict[tuple[str, str], float | None]:
    """Our value per (dataset, metric) cell; 'average*' cells are the mean over the table's real datasets."""
    real = {dataset for dataset, _ in cells if not dataset.startswith("average")}
    out: dict[tuple[str, str], float | None] = {}
    for dataset, metric in cells:
        if dataset.startswith("average"):
            present = [values[d][metric] for d in real if values.get(d, {}).get(metric) is not None]
            out[(dataset, metric)] = round(float(np.mean(present)), 1) if present else None
        else:
            out[(dataset, metric)] = values.get(dataset, {}).get(metric)
    return out


def _paper_cells(key: str) -> tuple[list[tuple[str, str]], dict[str, dict[tuple[str, str], float | None]]]:
    """The (dataset, metric) columns a paper table prints (non-null somewhere), and its values per row."""
    frame = paper_table(key)
    present = frame.dropna(subset=["value"])
    cells = list(dict.fromkeys(zip(present["dataset"], present["metric"])))
    values: dict[str, dict[tuple[str, str], float | None]] = {}
    for record in frame.itertuples():
        values.setdefault(record.row, {})[(record.dataset, record.metric)] = \
            None if math.isnan(record.value) else record.value
    return cells, values


AVERAGE_NAMES = {"average": "Average", "average_image": "Average (image)", "average_pixel": "Average (pixel)"}


def _dataset_names() -> dict[str, str]:
    """Row names: each dataset as its declaration says the paper's tables print it."""
    return {slug: spec.table_name for slug, spec in DATASETS.items()} | AVERAGE_NAMES


def _ours_label(label: str, profile: Profile) -> str:
    return f"{label} (ours, {profile.name})"


def _table1_sources(benchmark: Benchmark) -> dict[str, str]:
    """Each Table 1 dataset's auxiliary dataset: the default one's targets, and the default itself from the
    training that targets it (MVTec for VisA)."""
    default = benchmark.main.auxiliary
    sources = {target: default for target in benchmark.main.targets[default]}
    return sources | {default: auxiliary for auxiliary, targets in benchmark.table1_trainings.items()
                      if default in targets}


def _baseline_columns(benchmark: Benchmark, profile: Profile, published: dict[str, dict[Cell, float | None]],
                      cells: list[Cell]) -> list[MethodColumn]:
    """The published methods' columns in the paper's order, each run baseline's right after its published one;
    methods outside the paper's table (WMoE-CLIP) follow with the numbers their own paper published."""
    sources = _table1_sources(benchmark)
    ours = {}
    for method, entry in benchmark.methods.items():
        metrics = _read_json(profile.layout.baseline_metrics(method))
        values = {target: metrics[auxiliary][target] for target, auxiliary in sources.items()}
        ours[entry.published] = MethodColumn(_ours_label(entry.label, profile), _with_averages(values, cells), True)
    other = load_other_results()
    columns = []
    for name in [*published, *(name for name in ours if name not in published)]:
        if name in published:
            columns.append(MethodColumn(name, published[name]))
        else:
            values = other[name]["results"]
            columns.append(MethodColumn(f"{name} (published)", {cell: values.get(cell[0], {}).get(cell[1])
                                                                for cell in cells}))
        if name in ours:
            columns.append(ours[name])
    return columns


def table1(benchmark: Benchmark, profile: Profile) -> MethodTable:
    """Table 1 from the main and the baselines' evaluations: each dataset's number from the training the paper
    uses for it, each method's published numbers beside ours."""
    results = load_paper_results()["table1"]
    ours_values: Values = {target: _read_json(profile.layout.evaluation_metrics(auxiliary, target))
                           for target, auxiliary in _table1_sources(benchmark).items()}
    datasets = {metric: [*(results["image_datasets"] if metric.startswith("image") else results["pixel_datasets"]),
                         "average_image" if metric.startswith("image") else "average_pixel"]
                for metric in TABLE1_METRICS}
    cells = [(d, m) for m in TABLE1_METRICS for d in datasets[m]]
    _, paper = _paper_cells("table1")
    published = {name: paper[name] for name in results["methods"] if name != "MoECLIP"}
    columns = [*_baseline_columns(benchmark, profile, published, cells),
               MethodColumn("MoECLIP (paper)", paper["MoECLIP"]),
               MethodColumn(_ours_label("MoECLIP", profile), _with_averages(ours_values, cells), True)]
    return MethodTable("Table 1: zero-shot anomaly detection across 14 datasets", TABLE1_METRICS, datasets, columns,
                       _dataset_names(), ours_competes=not profile.data.synthetic)


def baseline_parameters(benchmark: Benchmark, profile: Profile) -> str:
    """The run baselines' parameter counts (M) as a Markdown table."""
    lines = ["| method | parameters (M) | trainable (M) |", "|---|---:|---:|"]
    for method, entry in benchmark.methods.items():
        counts = _read_json(profile.layout.baseline_resources(method))
        lines.append(f"| {entry.label} | {counts['params_m']:.2f} | {counts['trainable_m']:.4f} |")
    return "\n".join(lines)


def paper_name(key: str) -> str:
    """How a report heading names an experiment: the paper's 'Table 2' / 'Fig. 6' for a key that is its number
    ('table2', 'fig6'), the key itself otherwise."""
    number = re.fullmatch(r"(table|fig)(\d+)", key)
    return f"{'Table' if number[1] == 'table' else 'Fig.'} {number[2]}" if number else key


def experiment_table(benchmark: Benchmark, profile: Profile, key: str) -> Comparison:
    """A table experiment from its metrics.json, rows in params order: beside the paper's numbers where
    paper_results.yaml has the key (Tables 2, 5-13), else our columns alone (what our metrics hold)."""
    metrics = _read_json(profile.layout.experiment_metrics(key))
    runs = experiment_runs(benchmark, profile, key)
    if key in load_paper_results():
        cells, paper_by_row = _paper_cells(key)
        paper = {run.name: paper_by_row.get(run.paper_row, {}) for run in runs}
        paper_rows = {run.name: run.paper_row for run in runs}
    else:  # the cells our metrics hold, in their order
        cells = list(dict.fromkeys((dataset, metric) for run in runs
                                   for dataset, values in metrics.get(run.name, {}).items() for metric in values))
        paper, paper_rows = None, {}
    ours = {run.name: _with_averages(metrics.get(run.name, {}), cells) for run in runs}
    return Comparison(key, f"{paper_name(key)}: {benchmark.experiments[key].title}", [run.name for run in runs],
                      cells, ours, paper, paper_rows, _dataset_names())


def table14(profile: Profile) -> Comparison:
    """Table 14 from the analysis stage's routed-patch statistics (raw statistics, not x100)."""
    statistics = pd.read_csv(_stage_output(profile.layout.analysis() / "routed_statistics.csv"))
    cells, paper_by_row = _paper_cells("table14")
    dataset = profile.analysis.statistics_dataset
    ours = {f"Expert {int(row.expert)}": {(dataset, m): getattr(row, m) for _, m in cells}
            for row in statistics.itertuples()}
    rows = list(ours)
    return Comparison("table14", f"Table 14: routed-patch statistics at layer {profile.analysis.layer} "
                      f"({dataset}, top-1)", rows, cells, ours, {r: paper_by_row.get(r, {}) for r in rows},
                      dataset_names=_dataset_names(), mark_best=False, digits=2)


def experiment_tables(benchmark: Benchmark) -> list[str]:
    """The experiments params.yaml renders as a table (`render: table`), in its order."""
    return [key for key, experiment in benchmark.experiments.items() if experiment.render == "table"]


def experiment_figures(benchmark: Benchmark) -> list[str]:
    """The experiments params.yaml renders as a figure (`render: figure`): sweeps, with their numbers beside."""
    return [key for key, experiment in benchmark.experiments.items() if experiment.render == "figure"]


SIMILARITY_FIGURE, UTILISATION_FIGURE = "fig5_expert_similarity.png", "fig9_expert_utilisation.png"


def figure_files(benchmark: Benchmark) -> list[str]:
    """The report's figures: one per sweep experiment of params.yaml, then the analysis figures."""
    return [*(sweep_file(key, benchmark.experiments[key].title) for key in experiment_figures(benchmark)),
            SIMILARITY_FIGURE, UTILISATION_FIGURE]


def sweep_file(key: str, title: str) -> str:
    """A sweep figure's file name from its key and title.

    ('fig6', 'Number of experts K') -> fig6_number_of_experts_k.png
    """
    return f"{key}_{re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_')}.png"


# -- figures ---------------------------------------------------------------------------------
def _sweep_values(benchmark: Benchmark, profile: Profile, key: str) -> pd.DataFrame:
    """A figure experiment's variants as rows: the parameter and value of their `x` (the value as params.yaml
    writes it: 0.01, not 0.010000), and our metrics."""
    metrics = _read_json(profile.layout.experiment_metrics(key))
    dataset = benchmark.experiments[key].datasets[0]
    rows = []
    for name, variant in selected_variants(benchmark, profile, key).items():
        [(parameter, value)] = (variant.x or {}).items()
        rows.append({"parameter": parameter, "value": str(value), **metrics.get(name, {}).get(dataset, {})})
    return pd.DataFrame(rows)


def sweep_figure(frame: pd.DataFrame, title: str) -> Figure:
    """One panel per swept parameter: image and pixel AUROC against the parameter's values."""
    parameters = list(dict.fromkeys(frame["parameter"]))
    fig = Figure(figsize=(4 * len(parameters), 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(parameters)))
    for ax, parameter in zip(axes, parameters):
        part = frame[frame["parameter"] == parameter]
        part = part.iloc[np.argsort(part["value"].astype(float).to_numpy(), kind="stable")]
        for metric in ("image_auroc", "pixel_auroc"):
            if metric in part:
                ax.plot(part["value"].astype(str), part[metric], marker="o", label=metric.replace("_", " "))
        ax.set_xlabel(parameter)
        ax.set_ylabel("x100")
        ax.legend()
    fig.suptitle(title)
    return fig


def sweep_markdown(frame: pd.DataFrame) -> str:
    """A sweep's numbers: each value as the variant names it (0.01 stays 0.01), metrics to one decimal."""
    metrics = [column for column in frame.columns if column not in ("parameter", "value")]
    text = frame.astype({"value": str}).assign(**{column: frame[column].map(fmt) for column in metrics})
    return text.to_markdown(index=False, disable_numparse=True, colalign=["left", "right", *["right"] * len(metrics)])


def similarity_figure(matrix: list[list[float | None]], layer: int, dataset: str) -> Figure:
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig = Figure(figsize=(4.5, 4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, vmin=-1, vmax=1, cmap="coolwarm")
    labels = [f"E{i + 1}" for i in range(len(values))]
    ax.set_xticks(range(len(values)), labels)
    ax.set_yticks(range(len(values)), labels)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, fmt(value, 2), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    ax.set_title(f"Inter-expert cosine similarity\nlayer {layer}, {dataset}")  # one line is wider than the plot
    return fig


def utilisation_figure(frame: pd.DataFrame) -> Figure:
    """Fig. 9: each dataset's routing assignments stacked by expert."""
    shares = frame.pivot_table(index="dataset", columns="expert", values="share", sort=False)
    fig = Figure(figsize=(max(6.0, 0.6 * len(shares)), 4), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(shares))
    for expert in shares.columns:
        ax.bar(shares.index, shares[expert], bottom=bottom, label=f"expert {expert}")
        bottom += shares[expert].to_numpy()
    ax.set_ylabel("share of assignments (%)")
    ax.tick_params(axis="x", rotation=45)
    ax.set_ylim(0, 100)
    fig.legend(loc="outside right upper", fontsize=8)  # beside the bars: every bar reaches 100 %
    ax.set_title("Expert utilisation per dataset")
    return fig


# -- writing -----------------------------------------------------------------------------------
RESOURCE_COLUMNS = {"params_m": "Params (M)", "trainable_m": "Trainable (M)", "seconds": "Wall time (s)",
                    "peak_rss_gib": "Peak RSS (GiB)", "cuda_peak_gib": "CUDA peak (GiB)"}


def resources_markdown(benchmark: Benchmark, profile: Profile, key: str) -> str:
    """Each variant's parameter counts, and its wall time and peak memory where they were measured."""
    resources = _read_json(profile.layout.experiment_resources(key))
    frame = pd.DataFrame([{"Variant": run.name, **resources.get(run.name, {})}
                          for run in experiment_runs(benchmark, profile, key)])
    columns = [column for column in RESOURCE_COLUMNS if column in frame and frame[column].notna().any()]
    table = frame[["Variant", *columns]].rename(columns=RESOURCE_COLUMNS)
    digits = ["", *(".3f" if column.endswith("_m") else ".2f" for column in columns)]  # counts to the thousand
    return f"Variants of {key}: size and cost\n\n" + table.to_markdown(index=False, floatfmt=digits)


def _write_text(path: Path, text: str) -> None:
    write_text_atomically(path, text if text.endswith("\n") else text + "\n")


def _banner(profile: Profile) -> str:
    if profile.train.max_steps is not None:
        return (f"> Profile `{profile.name}`: a **smoke run**: {profile.model.backbone} at "
                f"{profile.model.image_size} px "
                f"with {'random' if profile.model.weights is None else profile.model.weights} weights, at most "
                f"{profile.train.max_steps} optimiser step(s) per training, "
                f"{'synthetic' if profile.data.synthetic else 'real'} data. It proves that every stage and variant "
                "runs at this size; its numbers mean nothing and are never to be compared with the paper's.")
    if profile.data.synthetic:
        return (f"> Profile `{profile.name}`: synthetic datasets and a tiny random-weight ViT. These numbers show the "
                "pipeline end to end; they are **not** paper results. Paper numbers are the paper's as printed.")
    return f"> Profile `{profile.name}`: our numbers vs the paper's as printed (Δ = ours - paper)."


def render_reports(benchmark: Benchmark, profile: Profile) -> Path:
    """Write every table (.md and .tex) and figure (.png) of the profile, plus README.md indexing them."""
    out = profile.layout.reports
    sections = [f"# Results: profile `{profile.name}`", "", _banner(profile), "",
                "Bold marks the best value of each column (ours and the paper's separately; in Table 1 the best "
                "method per dataset, where synthetic-data numbers never count). Δ = ours - paper.", ""]
    first = table1(benchmark, profile)
    first_markdown = method_markdown(first).rstrip("\n") + "\n\n" + baseline_parameters(benchmark, profile) + "\n"
    _write_text(out / "table1.md", first_markdown)
    _write_text(out / "table1.tex", method_latex(first))
    sections.append(first_markdown)
    comparisons = [experiment_table(benchmark, profile, key) for key in experiment_tables(benchmark)]
    comparisons.append(table14(profile))
    for comparison in comparisons:
        markdown = variant_markdown(comparison)
        if comparison.key in benchmark.experiments:
            markdown = markdown.rstrip("\n") + "\n\n" + resources_markdown(benchmark, profile, comparison.key)
        _write_text(out / f"{comparison.key}.md", markdown)
        _write_text(out / f"{comparison.key}.tex", variant_latex(comparison))
        sections.append(markdown)
    sweeps = {key: _sweep_values(benchmark, profile, key) for key in experiment_figures(benchmark)}
    figures = {sweep_file(key, benchmark.experiments[key].title):
               sweep_figure(frame, f"{paper_name(key)}: {benchmark.experiments[key].title}")
               for key, frame in sweeps.items()}
    similarity = _read_json(profile.layout.analysis() / "similarity.json")
    figures[SIMILARITY_FIGURE] = similarity_figure(similarity["matrix"], similarity["layer"], similarity["dataset"])
    figures[UTILISATION_FIGURE] = utilisation_figure(
        pd.read_csv(_stage_output(profile.layout.analysis() / "utilisation.csv")))
    sections += ["## Figures", ""]
    for name, figure in figures.items():
        save_figure(figure, out / name)
        sections += [f"![{name}]({name})", ""]
    for key, frame in sweeps.items():
        sections += [f"### Numbers behind {key}", "", sweep_markdown(frame), "",
                     resources_markdown(benchmark, profile, key), ""]
    _write_text(out / "README.md", "\n".join(sections))
    return out
