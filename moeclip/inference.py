"""Anomaly detection on a user's own images: inputs checked up front, each image scored alone.

Every image is scored on the checkpoint's calibrated scale (moeclip/calibration.py), from no
statistic of the other images, so an image gets the same score alone, with others or repeated.
Inputs are files, folders (searched recursively for images) and glob patterns. Every mistake
(a missing path, a pattern that matches nothing, a folder without images, a file that is not an
image or cannot be decoded, an output path that is a file, a device that is not there, a checkpoint
without calibration) is one error line naming it, before the model is built.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from moeclip.atomic import atomic_path, write_text_atomically
from moeclip.calibration import Calibration
from moeclip.checkpoint import load_model, read_calibration, read_checkpoint
from moeclip.config import Domain
from moeclip.data.layouts import IMAGE_SUFFIXES
from moeclip.data.registry import DataError
from moeclip.data.transforms import read_image
from moeclip.figures import prediction_figure, save_figure
from moeclip.methods.base import ZeroShotMethod
from moeclip.runtime import resolve_device

GLOB_CHARACTERS = frozenset("*?[")
RESULT_COLUMNS = ("path", "score", "label", "image_score_raw", "map_max_raw", "map_mean_raw", "map_max",
                  "anomalous_area", "overlay", "mask")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files that files, folders and glob patterns name, each once, in the order given."""
    found: list[Path] = []
    for given in map(str, inputs):
        path = Path(given)
        if GLOB_CHARACTERS & set(given) and not path.exists():
            matches = sorted(Path(match) for match in glob.glob(given, recursive=True))
            images = [match for match in matches if match.is_file() and match.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise DataError(f"{given}: the pattern matches no image file")
            found += images
        elif path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not images:
                raise DataError(f"{given}: the folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += images
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{given}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
            found.append(path)
        else:
            raise DataError(f"{given}: no such file or folder")
    return list(dict.fromkeys(path.resolve() for path in found))


def check_images(paths: Sequence[Path]) -> None:
    """Decode every image once, so that a corrupt or truncated file is named before any work starts."""
    for path in tqdm(paths, desc="checking images", unit="image", disable=len(paths) < 100):
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot be read as an image ({err})") from None


def output_names(paths: Sequence[Path]) -> dict[Path, Path]:
    """A unique relative name per image, mirroring the inputs' tree below their common folder: 'a/x.png'
    and 'b/x.png' stay apart, and the extension is kept only where two names would otherwise clash."""
    root = Path(os.path.commonpath([str(path.parent) for path in paths]))
    relative = {path: path.relative_to(root) for path in paths}
    stems = [rel.with_suffix("") for rel in relative.values()]
    return {path: rel if stems.count(rel.with_suffix("")) > 1 else rel.with_suffix("")
            for path, rel in relative.items()}


@dataclass(frozen=True)
class Prediction:
    """One image's outputs: raw (the model's own scale) and calibrated (the checkpoint's fixed [0, 1] scale)."""

    path: Path
    raw_map: torch.Tensor  # (H, W) at the model's input size
    raw_score: float       # S_A
    calibrated_map: torch.Tensor
    score: float
    anomalous: bool

    @property
    def label(self) -> str:
        return "anomalous" if self.anomalous else "normal"

    def statistics(self, pixel_threshold: float | None) -> dict[str, object]:
        """The numbers a results row reports (`moeclip predict`'s tables, the served model's answers)."""
        area = None if pixel_threshold is None else float((self.calibrated_map >= pixel_threshold).float().mean())
        return {"score": self.score, "label": self.label, "image_score_raw": self.raw_score,
                "map_max_raw": float(self.raw_map.max()), "map_mean_raw": float(self.raw_map.mean()),
                "map_max": float(self.calibrated_map.max()), "anomalous_area": area}


def predict_images(model: ZeroShotMethod, calibration: Calibration, paths: Sequence[Path], description: str,
                   domain: Domain, batch_size: int, device: str | torch.device) -> Iterator[Prediction]:
    """Predictions for `paths` in order, `batch_size` images per forward pass, with a progress bar."""
    frame = pd.DataFrame({"image_path": [str(path) for path in paths], "mask_path": None, "label": 0,
                          "class_name": description, "description": description, "dataset": "own",
                          "domain": domain, "split": "test"})
    dataset = model.inputs(frame)
    with torch.inference_mode(), tqdm(total=len(paths), desc="images", unit="image") as bar:
        for start in range(0, len(paths), batch_size):
            indices = range(start, min(start + batch_size, len(paths)))
            images = torch.stack([dataset[index]["image"] for index in indices]).to(device)
            raw_maps, raw_scores = model.predict(images, [description] * len(indices), domain)
            raw_maps, raw_scores = raw_maps.float().cpu(), raw_scores.float().cpu()
            scores = calibration.scores(raw_maps, raw_scores, domain)
            for offset, index in enumerate(indices):
                score = float(scores[offset])
                yield Prediction(paths[index], raw_maps[offset], float(raw_scores[offset]),
                                 calibration.maps(raw_maps[offset]), score, score >= calibration.image_threshold)
            bar.update(len(indices))


def _at_image_size(values: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) map resized to an image's (height, width)."""
    return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=True)[0, 0].numpy()


def write_prediction(prediction: Prediction, calibration: Calibration, out: Path, name: Path,
                     masks: bool) -> dict[str, object]:
    """The overlay (and the mask) of one prediction under `out`; its row of the results table."""
    image = np.asarray(read_image(prediction.path).convert("RGB"))
    amap = _at_image_size(prediction.calibrated_map, image.shape[:2])
    overlay = out / f"{name}_anomaly_map.png"
    title = f"{prediction.path.name}: score {prediction.score:.3f} ({prediction.label})"
    save_figure(prediction_figure(image, amap, title), overlay)
    threshold = calibration.pixel_threshold
    mask = None
    if masks and threshold is not None:
        mask = out / f"{name}_mask.png"
        with atomic_path(mask) as temporary:
            Image.fromarray(((amap >= threshold) * 255).astype(np.uint8)).save(temporary, format="PNG")
    return {"path": str(prediction.path), **prediction.statistics(threshold), "overlay": str(overlay),
            "mask": None if mask is None else str(mask)}


def run_prediction(inputs: Sequence[str | Path], checkpoint: Path, description: str, domain: Domain, out: Path,
                   batch_size: int = 8, device: str = "auto", masks: bool = False,
                   threshold: float | None = None) -> pd.DataFrame:
    """Score a user's images with a calibrated checkpoint: overlays (and masks) under `out`, with
    results.csv and results.json (one row per image); returns the results. `threshold` replaces the
    checkpoint's F1-best image threshold for the labels."""
    if domain not in ("industrial", "medical"):
        raise DataError(f"--domain {domain!r}: expected industrial or medical")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise DataError(f"--threshold {threshold}: scores lie in [0, 1]")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a folder")
    paths = collect_images(inputs)
    device = resolve_device(device)
    check_images(paths)
    calibration = read_calibration(checkpoint, read_checkpoint(checkpoint))
    if threshold is not None:
        calibration = dataclasses.replace(calibration, image_threshold=threshold)
    if masks and calibration.pixel_threshold is None:
        raise DataError(f"--masks: checkpoint '{checkpoint}' was calibrated on data without masks, so it has no "
                        f"pixel threshold")
    model, _ = load_model(checkpoint, device)
    names = output_names(paths)
    rows = [write_prediction(prediction, calibration, out, names[prediction.path], masks)
            for prediction in predict_images(model, calibration, paths, description, domain, batch_size, device)]
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    with atomic_path(out / "results.csv") as temporary:
        results.to_csv(temporary, index=False)
    write_text_atomically(out / "results.json", json.dumps(
        {"checkpoint": str(checkpoint), "class": description, "domain": domain,
         "calibration": calibration.as_dict(), "images": rows}, indent=2) + "\n")
    return results
