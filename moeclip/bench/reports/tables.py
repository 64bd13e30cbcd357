"""Comparison tables: our numbers beside the paper's, with the difference and the best values marked.

A `Comparison` holds one value of ours and one of the paper's per (row, column); the renderers
turn it into Markdown and LaTeX. Two shapes cover every table of the paper:
- variant tables (Tables 2, 5-14): rows are variants, each column (dataset, metric) shows
  ours | paper | difference (ours alone for an experiment the paper has no numbers for), in groups
  of a few columns per sub-table to stay readable;
- the method table (Table 1): one sub-table per metric, rows are datasets, columns are the
  published methods with our run of each baseline beside its published numbers, the paper's
  MoECLIP, ours and the difference.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

COLUMNS_PER_BLOCK = 4
LOWER_IS_BETTER = {"params_m", "inference_ms", "peak_memory_mb", "flops_g"}
METRIC_LABELS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP",
                 "params_m": "Params (M)", "inference_ms": "Inference (ms)", "peak_memory_mb": "Peak memory (MB)",
                 "flops_g": "FLOPs (G)", "gradient": "Gradient", "contrast": "Contrast", "entropy": "Entropy"}

Cell = tuple[str, str]  # (dataset, metric)


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if _missing(value) else f"{value:.{digits}f}"


def fmt_delta(ours: float | None, paper: float | None, digits: int = 1) -> str:
    if _missing(ours) or _missing(paper):
        return "-"
    return f"{ours - paper:+.{digits}f}"


def best_index(values: list[float | None], metric: str) -> set[int]:
    """Positions of the best present value(s) of a column (ties all marked)."""
    present = [(i, v) for i, v in enumerate(values) if not _missing(v)]
    if not present:
        return set()
    pick = min if metric in LOWER_IS_BETTER else max
    best = pick(v for _, v in present)
    return {i for i, v in present if v == best}


@dataclass
class Comparison:
    """Ours vs the paper for one table: `ours[row][cell]`, `paper[row][cell]` (cell = (dataset, metric)); `paper`
    None: the paper has no such table, so each column is ours alone."""

    key: str
    title: str
    rows: list[str]
    cells: list[Cell]
    ours: dict[str, dict[Cell, float | None]]
    paper: dict[str, dict[Cell, float | None]] | None
    paper_rows: dict[str, str] = field(default_factory=dict)  # our row -> paper row label, when they differ
    dataset_names: dict[str, str] = field(default_factory=dict)
    mark_best: bool = True
    digits: int = 1

    def column_label(self, cell: Cell) -> str:
        dataset, metric = cell
        name = self.dataset_names.get(dataset, dataset)
        return f"{name} {METRIC_LABELS.get(metric, metric)}"

    def row_label(self, row: str) -> str:
        paper_row = self.paper_rows.get(row)
        return f"{row} (paper: {paper_row})" if paper_row and paper_row != row else row

    @property
    def parts(self) -> tuple[str, ...]:
        """What each column shows, as its header names it."""
        return ("ours",) if self.paper is None else ("ours", "paper", "Δ")

    def blocks(self) -> list[list[Cell]]:
        return [self.cells[i:i + COLUMNS_PER_BLOCK] for i in range(0, len(self.cells), COLUMNS_PER_BLOCK)]

    def marks(self, cell: Cell) -> tuple[set[int], set[int]]:
        """Rows holding the best ours and the best paper value of a column."""
        if not self.mark_best:
            return set(), set()
        ours = [self.ours.get(row, {}).get(cell) for row in self.rows]
        paper = [(self.paper or {}).get(row, {}).get(cell) for row in self.rows]
        return best_index(ours, cell[1]), best_index(paper, cell[1])


def _md_bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold and text != "-" else text


def _tex_bold(text: str, bold: bool) -> str:
    return rf"\textbf{{{text}}}" if bold and text != "-" else text


def _tex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                          ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, escaped)
    return text


def _row_cells(table: Comparison, block: list[Cell], row_index: int, bold: Callable) -> list[str]:
    row = table.rows[row_index]
    cells = []
    for cell in block:
        ours = table.ours.get(row, {}).get(cell)
        best_ours, best_paper = table.marks(cell)
        cells.append(bold(fmt(ours, table.digits), row_index in best_ours))
        if table.paper is not None:
            paper = table.paper.get(row, {}).get(cell)
            cells += [bold(fmt(paper, table.digits), row_index in best_paper), fmt_delta(ours, paper, table.digits)]
    return cells


def variant_markdown(table: Comparison) -> str:
    parts = [f"### {table.title}", ""]
    for block in table.blocks():
        header = ["variant"] + [f"{table.column_label(c)} {part}" for c in block for part in table.parts]
        parts += ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        for index, row in enumerate(table.rows):
            parts.append("| " + " | ".join([table.row_label(row), *_row_cells(table, block, index, _md_bold)]) + " |")
        parts.append("")
    return "\n".join(parts)


def variant_latex(table: Comparison) -> str:
    parts = [f"% {table.title}"]
    for block in table.blocks():
        width = len(table.parts)
        parts += [r"\begin{tabular}{l" + "r" * width * len(block) + "}", r"\toprule"]
        groups = " & ".join(rf"\multicolumn{{{width}}}{{c}}{{{_tex_escape(table.column_label(c))}}}" for c in block)
        names = " & ".join(part.replace("Δ", r"$\Delta$") for part in table.parts)
        parts += [f"variant & {groups} \\\\", " & ".join([""] + [names] * len(block)) + r" \\", r"\midrule"]
        for index, row in enumerate(table.rows):
            cells = [_tex_escape(table.row_label(row)), *_row_cells(table, block, index, _tex_bold)]
            parts.append(" & ".join(cells) + r" \\")
        parts += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(parts)


@dataclass(frozen=True)
class MethodColumn:
    """One method's numbers in Table 1: published (`ours` False) or from our run."""

    label: str
    values: dict[Cell, float | None]
    ours: bool = False


@dataclass
class MethodTable:
    """Table 1: per metric, datasets as rows and methods as columns: each run baseline's published numbers beside
    ours, the other published methods, then MoECLIP (paper) and ours, and ours minus the paper's MoECLIP."""

    title: str
    metrics: list[str]
    datasets: dict[str, list[str]]  # metric -> datasets (rows) in paper order
    columns: list[MethodColumn]  # the last two are MoECLIP (paper) and MoECLIP (ours)
    dataset_names: dict[str, str] = field(default_factory=dict)
    ours_competes: bool = True  # False for demo numbers: they must never look like the best method

    def best(self, values: list[float | None], metric: str) -> set[int]:
        """Positions of the best method(s) of a row; our runs only when they compete."""
        return best_index([v if self.ours_competes or not column.ours else None
                           for v, column in zip(values, self.columns)], metric)

    def rows(self, metric: str) -> list[tuple[str, list[float | None], float | None, float | None]]:
        """(dataset, every column's value, our MoECLIP, the paper's MoECLIP) per row of one metric."""
        out = []
        for dataset in self.datasets[metric]:
            values = [column.values.get((dataset, metric)) for column in self.columns]
            out.append((dataset, values, values[-1], values[-2]))
        return out


def method_markdown(table: MethodTable) -> str:
    parts = [f"### {table.title}", ""]
    for metric in table.metrics:
        header = ["dataset", *(column.label for column in table.columns), "Δ"]
        parts += [f"**{METRIC_LABELS[metric]}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" + "---:|" * (len(header) - 1)]
        for dataset, values, ours, paper in table.rows(metric):
            best = table.best(values, metric)
            cells = [_md_bold(fmt(v), i in best) for i, v in enumerate(values)]
            parts.append("| " + " | ".join([table.dataset_names.get(dataset, dataset), *cells,
                                            fmt_delta(ours, paper)]) + " |")
        parts.append("")
    return "\n".join(parts)


def method_latex(table: MethodTable) -> str:
    parts = [f"% {table.title}"]
    for metric in table.metrics:
        names = [*(_tex_escape(column.label) for column in table.columns), r"$\Delta$"]
        parts += [rf"% {METRIC_LABELS[metric]}", r"\begin{tabular}{l" + "r" * len(names) + "}", r"\toprule",
                  "dataset & " + " & ".join(names) + r" \\", r"\midrule"]
        for dataset, values, ours, paper in table.rows(metric):
            best = table.best(values, metric)
            cells = [_tex_bold(fmt(v), i in best) for i, v in enumerate(values)]
            parts.append(" & ".join([_tex_escape(table.dataset_names.get(dataset, dataset)), *cells,
                                     fmt_delta(ours, paper)]) + r" \\")
        parts += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(parts)
