"""A torch Dataset over a manifest DataFrame (the contract of `moeclip.data.manifest`).

Why: training and evaluation both need, per manifest row, the preprocessed image, its binary
mask on the same grid and the row's metadata, in a form a multi-worker DataLoader can batch.

Randomness (training augmentation) comes from `generator` when one is given, else from the
global torch RNG. With `num_workers > 0` every worker holds a copy of the dataset: the global
RNG is seeded per worker by the DataLoader itself (from its own `generator`), while a passed
generator would be the same copy in every worker, so pass `worker_init_fn=seed_worker` to
reseed it from the worker's seed. Seed the DataLoader's `generator` for repeatable runs.
Training passes `seed` instead: each item then draws from its own generator seeded by
(seed, epoch, index), so results do not depend on access order, workers or resuming.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from moeclip.data.transforms import (
    DEFAULT_AUGMENTATION,
    AugmentConfig,
    augment,
    image_to_tensor,
    normalize,
    read_image,
    read_mask,
)

TEXT_FIELDS: tuple[str, ...] = ("class_name", "description", "dataset", "domain")
REQUIRED_COLUMNS: tuple[str, ...] = ("image_path", "mask_path", "label", *TEXT_FIELDS)


class ManifestDataset(Dataset[dict[str, Any]]):
    """One item per manifest row: `image` (3,S,S) CLIP-normalised, `mask` (1,S,S) of 0/1,
    `has_mask`, `label`, `class_name`, `description`, `dataset`, `domain`, `path`.

    `train=True` applies `augmentation` (SPEC.md section 7) to image and mask alike.
    `has_mask` says whether the pixel ground truth is known: true for normal images (their
    truth is all zeros) and for anomalous images with a mask file; false for anomalous images
    without one (their `mask` is zeros but must not be scored or trained on as truth).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        image_size: int,
        train: bool = False,
        generator: torch.Generator | None = None,
        *,
        augmentation: AugmentConfig = DEFAULT_AUGMENTATION,
        seed: int | None = None,
    ) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"manifest frame lacks columns {missing}")
        self.rows = [_clean_row(row) for row in frame[list(REQUIRED_COLUMNS)].to_dict("records")]
        self.image_size = image_size
        self.train = train
        self.generator = generator
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """With a `seed`, augmentation of item i in epoch e depends on (seed, e, i) alone."""
        self.epoch = epoch

    def _augmentation_generator(self, index: int) -> torch.Generator | None:
        """Per-item randomness makes a resumed epoch (or any worker split) augment exactly as an uninterrupted one."""
        if self.seed is None:
            return self.generator
        mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (1 << 63)
        return torch.Generator().manual_seed(mixed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image = image_to_tensor(read_image(row["image_path"]), self.image_size)
        if row["mask_path"] is None:
            mask = torch.zeros(1, self.image_size, self.image_size)
        else:
            mask = read_mask(row["mask_path"], self.image_size)
        if self.train:
            image, mask = augment(image, mask, self._augmentation_generator(index), self.augmentation)
        return {
            "image": normalize(image),
            "mask": mask,
            "has_mask": row["mask_path"] is not None or row["label"] == 0,
            "label": torch.tensor(row["label"], dtype=torch.long),
            **{field: str(row[field]) for field in TEXT_FIELDS},
            "path": str(row["image_path"]),
        }


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """Plain Python values: an int label, and None (not NaN) for a missing mask."""
    mask = row["mask_path"]
    return {**row, "label": int(row["label"]), "mask_path": None if pd.isna(mask) else str(mask)}


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: give each worker's copy of the generator its own seed.

    `worker_id` is not needed: `torch.initial_seed()` already differs per worker (base seed + id).
    """
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, ManifestDataset) and info.dataset.generator is not None:
        info.dataset.generator = torch.Generator().manual_seed(torch.initial_seed())


def loader_options(device: torch.device, num_workers: int | None = None) -> dict[str, Any]:
    """DataLoader settings that keep an accelerator busy.

    Images are decoded, resized and augmented in worker processes (by default one per spare
    core on CUDA, and none on the CPU, where the model already uses every core); batches are
    pinned so host-to-device copies run asynchronously; each worker prefetches 4 batches.
    """
    if num_workers is None:
        num_workers = max(1, len(os.sched_getaffinity(0)) - 1) if device.type == "cuda" else 0
    options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        options["prefetch_factor"] = 4
    return options
