"""The MoECLIP paper's published numbers, shipped as ``paper_results.yaml`` next to this module.

Each table entry holds ``results`` nested as its ``layout`` says (default: row -> dataset -> metric;
Table 15: dataset -> class -> metric). Values are as printed (x100 for AUROC/AP); ``None`` means the
paper prints '-' (not applicable).
"""
from __future__ import annotations

from importlib.resources import files
from typing import Any

import pandas as pd
import yaml

RESULTS_FILE = "paper_results.yaml"
OTHER_RESULTS_FILE = "other_results.yaml"  # methods outside the paper's Table 1
DEFAULT_LAYOUT = ("row", "dataset", "metric")
TIDY_COLUMNS = ["table", "row", "dataset", "metric", "value"]


def load_paper_results() -> dict[str, Any]:
    """Parse the shipped YAML into a fresh dict (callers may mutate it)."""
    text = files(__package__).joinpath(RESULTS_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_other_results() -> dict[str, Any]:
    """Published numbers of methods the paper's Table 1 does not print: {method: {source, results}}."""
    return yaml.safe_load(files(__package__).joinpath(OTHER_RESULTS_FILE).read_text(encoding="utf-8"))


def _table_key(name: str | int) -> str:
    """Accept ``1`` or ``"1"`` (the paper's number) or a key such as ``"table1"``; return the key."""
    key = str(name)
    return f"table{key}" if key.isdigit() else key


def _tables(results: dict[str, Any]) -> list[str]:
    """The keys of the entries that hold published numbers (the others describe the paper and its datasets)."""
    return [key for key, entry in results.items() if "results" in entry]


def table_names() -> list[str]:
    """Keys of every transcribed table, in paper order."""
    return _tables(load_paper_results())


def paper_table(name: str | int, results: dict[str, Any] | None = None) -> pd.DataFrame:
    """One table in tidy long form: columns table, row, dataset, metric, value.

    ``row`` is the method / variant (Table 15: the class); ``dataset`` is a dataset slug or a
    pseudo-key such as ``average_image`` or ``cost``. Null cells are kept as NaN.
    """
    key = _table_key(name)
    table = (results or load_paper_results())[key]
    outer = table.get("layout", DEFAULT_LAYOUT)[0]
    records = []
    for first, by_second in table["results"].items():
        for second, metrics in by_second.items():
            row, dataset = (second, first) if outer == "dataset" else (first, second)
            for metric, value in metrics.items():
                records.append((key, str(row), str(dataset), metric, value))
    frame = pd.DataFrame.from_records(records, columns=TIDY_COLUMNS)
    frame["value"] = frame["value"].astype(float)
    return frame


def all_paper_tables() -> pd.DataFrame:
    """Every transcribed table concatenated in tidy long form."""
    results = load_paper_results()
    return pd.concat([paper_table(key, results) for key in _tables(results)], ignore_index=True)


def paper_value(table: str | int, row: str, dataset: str, metric: str) -> float | None:
    """A single published number (``None`` where the paper prints '-')."""
    entry = load_paper_results()[_table_key(table)]
    outer = entry.get("layout", DEFAULT_LAYOUT)[0]
    first, second = (dataset, row) if outer == "dataset" else (row, dataset)
    return entry["results"][first][second][metric]
