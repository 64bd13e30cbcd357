"""Data layer: dataset registry, fetching, layout parsing, validation and manifests."""
from moeclip.data.registry import DATASETS, DataError, DatasetSpec, Source, get_dataset

__all__ = ["DATASETS", "DataError", "DatasetSpec", "Source", "get_dataset"]
