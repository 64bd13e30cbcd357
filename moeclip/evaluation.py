"""Zero-shot evaluation of a model on a manifest (SPEC 6 post-processing, SPEC 8 metrics).

Per class: test maps and image scores, min-max normalisation over the class, the
domain's image-score rule, then image and pixel AUROC / AP / F1-max (and AUPRO) where
the class can have them. Dataset figures are means over classes, x100.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moeclip.data.dataset import ManifestDataset
from moeclip.metrics import PixelMetricAccumulator, aupro, ranking_metrics
from moeclip.model import MoECLIP
from moeclip.model.scoring import finalize_class_scores

@dataclass
class Example:
    """One anomalous test image with its ground truth and class-normalised map, for figures."""

    path: str
    dataset: str
    class_name: str
    mask: np.ndarray
    amap: np.ndarray


@dataclass
class Evaluation:
    per_class: pd.DataFrame
    examples: list[Example] = field(default_factory=list)


METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro", "image_f1_max", "pixel_f1_max")


def _predict_class(model: MoECLIP, frame: pd.DataFrame, batch_size: int, device: torch.device,
                   num_workers: int) -> dict[str, torch.Tensor]:
    """Raw test maps and S_A for one class's images, with their labels and masks (on the CPU)."""
    dataset = ManifestDataset(frame, model.config.image_size, train=False)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    domain = frame["domain"].iloc[0]
    collected: dict[str, list[torch.Tensor]] = {"maps": [], "scores": [], "labels": [], "masks": [], "has_mask": []}
    with torch.inference_mode():
        for batch in loader:
            maps, scores = model.predict(batch["image"].to(device), batch[model.config.prompt_field], domain)
            collected["maps"].append(maps.float().cpu())
            collected["scores"].append(scores.float().cpu())
            collected["labels"].append(batch["label"])
            collected["masks"].append(batch["mask"][:, 0] > 0.5)
            collected["has_mask"].append(torch.as_tensor(batch["has_mask"]))
    outputs = {key: torch.cat(values) for key, values in collected.items()}
    outputs["maps"], outputs["final_scores"] = finalize_class_scores(outputs["maps"], outputs["scores"], domain)
    return outputs


def _class_metrics(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics the class can have: image ones need both labels, pixel ones need every mask known."""
    maps, scores = outputs["maps"], outputs["final_scores"]
    labels, masks = outputs["labels"], outputs["masks"]
    row: dict[str, float] = {}
    if labels.min() == 0 and labels.max() == 1:
        image = ranking_metrics(scores.numpy(), labels.numpy())
        row.update(image_auroc=image["auroc"], image_ap=image["ap"], image_f1_max=image["f1_max"])
    if bool(outputs["has_mask"].all()) and bool(masks.any()) and not bool(masks.all()):
        pixels = PixelMetricAccumulator()
        for one_map, one_mask in zip(maps, masks):
            pixels.update(one_map.numpy(), one_mask.numpy())
        pixel = pixels.compute()
        row.update(pixel_auroc=pixel["auroc"], pixel_ap=pixel["ap"], pixel_f1_max=pixel["f1_max"],
                   pixel_aupro=aupro(list(maps.numpy()), list(masks.numpy())))
    return row


def _classes(frame: pd.DataFrame) -> Iterator[tuple[tuple[str, str], pd.DataFrame]]:
    yield from frame.groupby(["dataset", "class_name"], sort=True)


def _examples(outputs: dict[str, torch.Tensor], group: pd.DataFrame, count: int) -> list[Example]:
    """The first `count` anomalous images of a class that have a mask."""
    chosen = [i for i in range(len(group)) if outputs["labels"][i] == 1 and outputs["masks"][i].any()][:count]
    return [Example(str(group["image_path"].iloc[i]), str(group["dataset"].iloc[i]), str(group["class_name"].iloc[i]),
                    outputs["masks"][i].numpy(), outputs["maps"][i].numpy()) for i in chosen]


def evaluate_frame(model: MoECLIP, frame: pd.DataFrame, batch_size: int = 8, device: str | torch.device = "cpu",
                   num_workers: int = 0, examples_per_class: int = 0) -> Evaluation:
    """One row per (dataset, class): counts and every metric the class can have (fractions, not x100)."""
    device = torch.device(device)
    model.eval()
    rows, examples = [], []
    groups = list(_classes(frame))
    for (dataset, class_name), group in tqdm(groups, desc="classes", unit="class"):
        outputs = _predict_class(model, group, batch_size, device, num_workers)
        rows.append({"dataset": dataset, "class_name": class_name, "n_images": len(group),
                     "n_anomalous": int(group["label"].sum()), **_class_metrics(outputs)})
        examples += _examples(outputs, group, examples_per_class)
    per_class = pd.DataFrame(rows, columns=["dataset", "class_name", "n_images", "n_anomalous", *METRICS])
    return Evaluation(per_class, examples)


def summarize(per_class: pd.DataFrame) -> pd.DataFrame:
    """Mean over each dataset's classes, x100 with one decimal (the paper's reporting)."""
    means = per_class.groupby("dataset")[list(METRICS)].mean() * 100
    return means.round(1).dropna(axis=1, how="all")
