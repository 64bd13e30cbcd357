"""Zero-shot evaluation of a model on a manifest (SPEC 6 post-processing, SPEC 8 metrics).

Per class: test maps and image scores, the method's per-class rule (MoECLIP: min-max
normalisation over the class and the domain's image-score rule; the baselines: their own
image score), then image and pixel AUROC / AP / F1-max (and AUPRO) where the class can
have them. Dataset figures are means over classes, x100.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moeclip.config import Domain
from moeclip.data.dataset import loader_options
from moeclip.metrics import pixel_metrics, ranking_metrics
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.execution import Execution, executing, model_execution


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


def _predict_class(model: ZeroShotMethod, batches: Iterable[dict[str, Any]], domain: Domain, device: torch.device,
                   execution: Execution) -> dict[str, torch.Tensor]:
    """One class's raw test maps and image scores (on `device`, before any normalisation), its labels and masks (on the
    CPU)."""
    collected: dict[str, list[torch.Tensor]] = {"maps": [], "scores": [], "labels": [], "masks": [], "has_mask": []}
    for batch in batches:
        with executing(model, execution, device.type):
            maps, scores = model.predict(batch["image"].to(device, non_blocking=True),
                                         model.prompt_texts(batch), domain)
        collected["maps"].append(maps.float())
        collected["scores"].append(scores.float())
        collected["labels"].append(batch["label"])
        collected["masks"].append(batch["mask"][:, 0] > 0.5)
        collected["has_mask"].append(torch.as_tensor(batch["has_mask"]))
    return {key: torch.cat(values) for key, values in collected.items()}


def _class_metrics(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics the class can have: image ones need both labels, pixel ones need every mask known.

    The scores are sorted where the maps are (on the GPU when evaluating on one).
    """
    maps, scores = outputs["maps"], outputs["final_scores"]
    labels, masks = outputs["labels"], outputs["masks"]
    row: dict[str, float] = {}
    if labels.min() == 0 and labels.max() == 1:
        image = ranking_metrics(scores, labels)
        row.update(image_auroc=image["auroc"], image_ap=image["ap"], image_f1_max=image["f1_max"])
    if bool(outputs["has_mask"].all()) and bool(masks.any()) and not bool(masks.all()):
        pixel = pixel_metrics(maps, masks)
        row.update(pixel_auroc=pixel["auroc"], pixel_ap=pixel["ap"], pixel_f1_max=pixel["f1_max"],
                   pixel_aupro=pixel["aupro"])
    return row


def _class_batches(sizes: list[int], batch_size: int) -> list[list[int]]:
    """Index batches over consecutive classes of the given sizes; no batch spans two classes."""
    batches, start = [], 0
    for size in sizes:
        batches += [list(range(i, min(i + batch_size, start + size))) for i in range(start, start + size, batch_size)]
        start += size
    return batches


def _classes(frame: pd.DataFrame) -> Iterator[tuple[tuple[str, str], pd.DataFrame]]:
    yield from frame.groupby(["dataset", "class_name"], sort=True)


def _examples(outputs: dict[str, torch.Tensor], group: pd.DataFrame, count: int) -> list[Example]:
    """The first `count` anomalous images of a class that have a mask."""
    chosen = [i for i in range(len(group)) if outputs["labels"][i] == 1 and outputs["masks"][i].any()][:count]
    return [Example(str(group["image_path"].iloc[i]), str(group["dataset"].iloc[i]), str(group["class_name"].iloc[i]),
                    outputs["masks"][i].numpy(), outputs["maps"][i].cpu().numpy()) for i in chosen]


def raw_class_outputs(model: ZeroShotMethod, frame: pd.DataFrame, batch_size: int, device: str | torch.device = "cpu",
                      num_workers: int | None = None, execution: Execution | None = None,
                      seed: int = 0) -> Iterator[tuple[pd.DataFrame, dict[str, torch.Tensor]]]:
    """Per (dataset, class), in that order: its rows of `frame` and their raw maps, S_A, labels and masks.

    Test-time randomness (Table 11's router noise) draws from torch's RNG seeded with `seed`
    inside this generator only, so a pass gives the same outputs every time it runs.

    One DataLoader streams all classes (no batch spans two), so its workers keep decoding
    across class boundaries; `num_workers` None picks them for `device` (see `loader_options`).
    The model runs as `execution` says, by default the fast path at the model's precision.
    """
    device = torch.device(device)
    execution = model_execution(model.config) if execution is None else execution
    model.eval()
    ordered = frame.sort_values(["dataset", "class_name"], kind="stable")
    groups = list(_classes(ordered))
    dataset = model.inputs(ordered, train=False)
    loader = DataLoader(dataset, batch_sampler=_class_batches([len(g) for _, g in groups], batch_size),
                        **loader_options(device, num_workers))
    batches = iter(loader)
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _, group in tqdm(groups, desc="classes", unit="class"):
            class_batches = itertools.islice(batches, math.ceil(len(group) / batch_size))
            yield group, _predict_class(model, class_batches, group["domain"].iloc[0], device, execution)


def evaluate_frame(model: ZeroShotMethod, frame: pd.DataFrame, batch_size: int, device: str | torch.device = "cpu",
                   num_workers: int | None = None, examples_per_class: int = 0,
                   execution: Execution | None = None, seed: int = 0) -> Evaluation:
    """One row per (dataset, class): counts and every metric the class can have (fractions, not x100).

    Per class, the method's rule over the class's test images (`protocol_scores`) comes before the metrics;
    see `raw_class_outputs` for the pass itself.
    """
    rows, examples = [], []
    for group, outputs in raw_class_outputs(model, frame, batch_size, device, num_workers, execution, seed):
        outputs["maps"], outputs["final_scores"] = model.protocol_scores(outputs["maps"], outputs["scores"],
                                                                         group["domain"].iloc[0])
        rows.append({"dataset": group["dataset"].iloc[0], "class_name": group["class_name"].iloc[0],
                     "n_images": len(group), "n_anomalous": int(group["label"].sum()), **_class_metrics(outputs)})
        examples += _examples(outputs, group, examples_per_class)
    per_class = pd.DataFrame(rows, columns=["dataset", "class_name", "n_images", "n_anomalous", *METRICS])
    return Evaluation(per_class, examples)


def summarize(per_class: pd.DataFrame) -> pd.DataFrame:
    """Mean over each dataset's classes, x100 with one decimal (the paper's reporting)."""
    means = per_class.groupby("dataset")[list(METRICS)].mean() * 100
    return means.round(1).dropna(axis=1, how="all")
