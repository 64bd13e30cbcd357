"""Exact anomaly-detection metrics: image/pixel AUROC, AP, F1-max and AUPRO.

All ranking metrics equal scikit-learn's definitions (ties included) but sort each class
separately in float32 and keep run-length tallies, so whole-dataset pixel metrics are
fast and memory-bounded (see ``PixelMetricAccumulator``).
"""

from moeclip.metrics.pro import aupro, pixel_metrics
from moeclip.metrics.ranking import (
    PixelMetricAccumulator,
    auroc,
    average_precision,
    f1_max,
    ranking_metrics,
)

__all__ = ["PixelMetricAccumulator", "aupro", "auroc", "average_precision", "f1_max", "pixel_metrics",
           "ranking_metrics"]
