"""Data layer: dataset registry, fetching, layout parsing, validation and manifests."""
from moeclip.data.registry import DATASETS, DataError, DatasetSpec, DemoPlan, Source, get_dataset, register

__all__ = ["DATASETS", "DataError", "DatasetSpec", "DemoPlan", "Source", "get_dataset", "register"]
