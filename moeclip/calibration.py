"""Scores on a fixed scale, whatever else is scored: raw outputs mapped through statistics kept with the model.

The benchmark protocol normalises maps and scores over all test images of a class
(`per_class_protocol_scores`), so one image's number depends on the others in its class. An image
scored alone needs a fixed scale instead. After training, the model runs over its auxiliary data
(labelled normal and anomalous images, with masks) and the range of its raw outputs is kept in the
checkpoint, as anomalib keeps its normalisation statistics:

    calibrated map  = clip((map - map_low) / (map_high - map_low), 0, 1)         per pixel
    calibrated S_A  = clip((S_A - score_low) / (score_high - score_low), 0, 1)
    score           = 0.5 * max(calibrated map) + 0.5 * calibrated S_A            industrial
                    = max(calibrated map)                                          medical

(the protocol's rule, on calibrated instead of per-class values). map_low is the 1st percentile of
all map values, map_high the 99th percentile of the images' map maxima, score_low and score_high
the 1st and 99th percentiles of S_A. The image threshold is the score with the best F1 over the
calibration images; the pixel threshold likewise over their pixels (maps and masks pooled to
POOLED x POOLED).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve

from moeclip.config import Domain
from moeclip.errors import MoeclipError
from moeclip.evaluation import raw_class_outputs
from moeclip.methods.base import ZeroShotMethod

POOLED = 64
LOW_QUANTILE, HIGH_QUANTILE = 0.01, 0.99


@dataclass(frozen=True)
class Calibration:
    """Ranges of a model's raw outputs and its thresholds on the calibrated scale (see the module docstring)."""

    map_low: float
    map_high: float
    score_low: float
    score_high: float
    image_threshold: float
    pixel_threshold: float | None  # None when no calibration image had a mask
    images: int

    def maps(self, raw_maps: torch.Tensor) -> torch.Tensor:
        """Raw anomaly maps (any shape) on the calibrated [0, 1] scale."""
        return _unit(raw_maps, self.map_low, self.map_high)

    def scores(self, raw_maps: torch.Tensor, raw_scores: torch.Tensor, domain: Domain) -> torch.Tensor:
        """(B,) calibrated image scores in [0, 1] from (B, H, W) raw maps and (B,) raw S_A."""
        return self.fused(raw_maps.flatten(1).amax(dim=1), raw_scores, domain)

    def fused(self, raw_peaks: torch.Tensor, raw_scores: torch.Tensor, domain: Domain) -> torch.Tensor:
        """(B,) calibrated image scores from the raw maps' maxima (the scaling keeps the maximum where it is)."""
        peak = self.maps(raw_peaks)
        if domain == "medical":
            return peak
        return 0.5 * peak + 0.5 * _unit(raw_scores, self.score_low, self.score_high)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unit(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((values.float() - low) / max(high - low, 1e-12)).clamp(0.0, 1.0)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t (anomalous when score >= t) with the highest F1 on `scores` and binary `labels`."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def _pooled(values: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, POOLED, POOLED) area means."""
    return F.adaptive_avg_pool2d(values.float()[:, None], POOLED)[:, 0]


def calibrate(model: ZeroShotMethod, frame: pd.DataFrame, batch_size: int, device: str | torch.device = "cpu") -> Calibration:
    """The model's Calibration on `frame` (its auxiliary data: both labels needed; masks where known)."""
    scores, peaks, pooled, labels, domains, pixel_maps, pixel_masks = [], [], [], [], [], [], []
    for group, outputs in raw_class_outputs(model, frame, batch_size, device):
        maps = outputs["maps"].float().cpu()
        known = outputs["has_mask"].bool()
        scores.append(outputs["scores"].float().cpu())
        peaks.append(maps.flatten(1).amax(dim=1))
        pooled.append(_pooled(maps))
        labels.append(outputs["labels"])
        domains += list(group["domain"])
        pixel_maps.append(pooled[-1][known])
        pixel_masks.append(_pooled(outputs["masks"][known]) >= 0.5)
    label = torch.cat(labels).numpy()
    if label.min() == label.max():
        raise MoeclipError("calibration needs normal and anomalous images; the data holds only one kind")
    score, peak = torch.cat(scores), torch.cat(peaks)
    ranges = Calibration(float(np.quantile(torch.cat(pooled).numpy(), LOW_QUANTILE)),
                         float(np.quantile(peak.numpy(), HIGH_QUANTILE)),
                         float(np.quantile(score.numpy(), LOW_QUANTILE)),
                         float(np.quantile(score.numpy(), HIGH_QUANTILE)),
                         image_threshold=0.0, pixel_threshold=None, images=len(label))
    medical = torch.tensor([domain == "medical" for domain in domains])
    final = torch.where(medical, ranges.fused(peak, score, "medical"), ranges.fused(peak, score, "industrial"))
    masks, masked_maps = torch.cat(pixel_masks), torch.cat(pixel_maps)
    pixel = None
    if bool(masks.any()) and not bool(masks.all()):
        pixel = best_f1_threshold(ranges.maps(masked_maps).flatten().numpy(), masks.flatten().numpy())
    return Calibration(**{**ranges.as_dict(), "image_threshold": best_f1_threshold(final.numpy(), label),
                          "pixel_threshold": pixel})
