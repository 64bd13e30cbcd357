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
import torch
from scipy import ndimage

from moeclip.metrics._runs import (
    ArrayLike,
    Runs,
    aligned_counts,
    as_array,
    require_both_classes,
    split_tallies,
    tally,
    tally_weighted,
    to_numpy,
    validate,
)
from moeclip.metrics.ranking import metrics_from_tallies

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def aupro(maps: ArrayLike | Iterable[ArrayLike], masks: ArrayLike | Iterable[ArrayLike], max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, max_fpr].

    ``maps`` and ``masks`` are (N, H, W) arrays/tensors or sequences of 2-D ones. The
    normal pixels are sorted where the maps live (on the GPU for CUDA tensors).
    """
    _check_max_fpr(max_fpr)
    pairs = [(as_array(amap), as_array(mask)) for amap, mask in zip(maps, masks, strict=True)]
    regions, n_regions = _region_tally(pairs)
    normal = [_select(amap, ~to_numpy(mask).astype(bool)) for amap, mask in pairs]
    joined = torch.cat(normal) if isinstance(normal[0], torch.Tensor) else np.concatenate(normal)
    return _normalised_area(regions, n_regions, tally(joined), max_fpr)


def pixel_metrics(maps: ArrayLike, masks: ArrayLike, max_fpr: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max (as ``ranking_metrics``) and AUPRO of (N, H, W) maps and masks.

    Every pixel is sorted once, where the maps live (on the GPU for CUDA tensors): the
    normal-pixel tally behind AUROC/AP also gives AUPRO's false-positive rates.
    """
    _check_max_fpr(max_fpr)
    maps, masks = as_array(maps), as_array(masks)
    validate(maps, masks, require_1d=False)
    positive, negative = split_tallies(maps, masks)
    ranking = metrics_from_tallies(positive, negative)
    regions, n_regions = _region_tally(list(zip(maps, masks)))
    return {**ranking, "aupro": _normalised_area(regions, n_regions, negative, max_fpr)}


def _check_max_fpr(max_fpr: float) -> None:
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")


def _select(scores: ArrayLike, where: np.ndarray) -> ArrayLike:
    """``scores[where]``, computed where the scores live."""
    if isinstance(scores, torch.Tensor):
        return scores[torch.from_numpy(where).to(scores.device)]
    return scores[where]


def _region_tally(pairs: list[tuple[ArrayLike, ArrayLike]]) -> tuple[Runs, int]:
    """Scores of the anomalous pixels, each weighted by 1 / (size of its region), and the number of regions.

    Regions are 8-connected components of each 2-D mask, labelled on the CPU.
    """
    if not pairs:
        raise ValueError("no anomaly maps were given")
    scores, weights, n_regions = [], [], 0
    for amap, mask in pairs:
        validate(amap, mask, require_1d=False)
        if len(amap.shape) != 2:
            raise ValueError(f"each anomaly map must be 2-D, got shape {tuple(amap.shape)}")
        gt = to_numpy(mask).astype(bool)
        labeled, n_found = ndimage.label(gt, structure=_EIGHT_CONNECTED)
        region_of_pixel = labeled[gt]
        scores.append(to_numpy(_select(amap, gt)))
        weights.append(1.0 / np.bincount(region_of_pixel, minlength=n_found + 1)[region_of_pixel])
        n_regions += n_found
    return tally_weighted(np.concatenate(scores), np.concatenate(weights)), n_regions


def _normalised_area(regions: Runs, n_regions: int, normal: Runs, max_fpr: float) -> float:
    require_both_classes(n_regions, normal.total())
    fpr, pro = _pro_curve(regions, normal, n_regions)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


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
