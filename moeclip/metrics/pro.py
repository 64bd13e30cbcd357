"""AUPRO: area under the per-region-overlap curve, as in the MVTec AD evaluation code.

Regions are the 8-connected components of each image's ground-truth mask. At a threshold
``t`` the PRO is the mean, over all regions of all images, of the fraction of the region's
pixels scoring ``>= t``; the FPR is the fraction of normal pixels scoring ``>= t``. The curve
is evaluated exactly at every distinct score (no fixed threshold grid), starts at (0, 0),
is integrated with the trapezoid rule up to ``max_fpr`` (linearly interpolated there) and
divided by ``max_fpr``. This matches ``compute_pro``/``trapezoid`` of the official MVTec
script; implementations sampling e.g. 200 thresholds give slightly different numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from moeclip.metrics._runs import (
    ArrayLike,
    Runs,
    aligned_counts,
    as_array,
    require_both_classes,
    tally_owned,
    tally_weighted,
    to_numpy,
    validate,
)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def aupro(maps: ArrayLike | Iterable[ArrayLike], masks: ArrayLike | Iterable[ArrayLike], max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, max_fpr].

    ``maps`` and ``masks`` are (N, H, W) arrays/tensors or sequences of 2-D ones.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    parts = [_image_parts(as_array(amap), as_array(mask)) for amap, mask in zip(maps, masks, strict=True)]
    if not parts:
        raise ValueError("no anomaly maps were given")
    normal_scores, region_scores, region_weights, found = zip(*parts)
    n_regions = sum(found)
    normal = tally_owned(np.concatenate(normal_scores))
    require_both_classes(n_regions, normal.total())
    regions = tally_weighted(np.concatenate(region_scores), np.concatenate(region_weights))
    fpr, pro = _pro_curve(regions, normal, n_regions)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def _image_parts(amap: ArrayLike, mask: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Normal-pixel scores, anomalous-pixel scores, their weights 1/(region size), #regions.

    All images' pixels are tallied together afterwards: one SIMD sort of the normal pixels
    is far cheaper than merging per-image tallies (costs one copy of the maps in memory).
    """
    validate(amap, mask, require_1d=False)
    if len(amap.shape) != 2:
        raise ValueError(f"each anomaly map must be 2-D, got shape {tuple(amap.shape)}")
    scores, gt = to_numpy(amap), to_numpy(mask).astype(bool)
    labeled, n_found = ndimage.label(gt, structure=_EIGHT_CONNECTED)
    region_of_pixel = labeled[gt]
    region_size = np.bincount(region_of_pixel, minlength=n_found + 1)
    return scores[~gt], scores[gt], 1.0 / region_size[region_of_pixel], n_found


def _pro_curve(regions: Runs, normal: Runs, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score from high to low, preceded by (0, 0)."""
    region_weight, normal_count = aligned_counts(regions, normal)
    fpr = np.cumsum(normal_count[::-1]) / normal.total()
    pro = np.cumsum(region_weight[::-1]) / n_regions
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) (x non-decreasing) over [x[0], x_max], interpolating at x_max."""
    stop = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.trapezoid(y[:stop], x[:stop]))
    if stop < x.size and x[stop - 1] < x_max:
        slope = (y[stop] - y[stop - 1]) / (x[stop] - x[stop - 1])
        y_end = y[stop - 1] + slope * (x_max - x[stop - 1])
        area += 0.5 * (y[stop - 1] + y_end) * (x_max - x[stop - 1])
    return area
