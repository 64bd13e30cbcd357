"""Checkpoints: only the modules a method adds to CLIP, plus what a resumed run needs, written atomically.

The frozen backbone is not stored: it is rebuilt from `model.weights` (or, for random
weights, from the build seed), so a ViT-L checkpoint is ~20 MB instead of ~1.7 GB.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moeclip.atomic import atomic_path
from moeclip.calibration import Calibration
from moeclip.errors import MoeclipError
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.registry import UnknownMethodError, build_method, method_config

# 2: the image score follows `model.image_score` and per-class normalisation the release's rule.
# 3: a method's loss settings are in its model config (MoECLIP's focal_gamma ... release_compat, a baseline's
#    focal_gamma), the train config is generic.
# Older formats are refused: format 1 computed S_A by neither formula, so its results cannot be reproduced;
# format 2's model config lacks the loss settings, so the configuration it was trained with is not one of ours.
FORMAT_VERSION = 3
OUTDATED = {1: "it scored images by a formula that is neither the paper's nor the release's",
            2: "its model config lacks the loss settings, which format 2 kept in its train config"}


class CheckpointError(MoeclipError):
    """A checkpoint file that is missing, unreadable or does not match the model."""


class OutdatedCheckpointError(CheckpointError):
    """A checkpoint of an earlier format, which this version cannot evaluate the way it was trained."""


def save_checkpoint(path: Path, model: ZeroShotMethod, build_seed: int | None, **state: Any) -> None:
    """Write the method's name, its added modules' weights, its config and `state` (optimizer, scheduler, RNG, ...)."""
    _write(path, {"format": FORMAT_VERSION, "method": model.name, "model_config": model.config.model_dump(mode="json"),
                  "build_seed": build_seed, "weights": model.trainable_state_dict(), **state})


def _write(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        # Through a file object the archive's inner folder is always "archive"; given a path, torch
        # names it after the (random) temporary file, and equal checkpoints would differ in bytes.
        torch.save(payload, handle)


def annotate_checkpoint(path: Path, **fields: Any) -> None:
    """Add `fields` to a checkpoint's payload (rewritten atomically)."""
    _write(path, {**read_checkpoint(path), **fields})


def store_calibration(path: Path, calibration: Calibration) -> None:
    """Keep the model's calibration (moeclip/calibration.py) in its checkpoint."""
    annotate_checkpoint(path, calibration=calibration.as_dict())


def read_calibration(path: Path, payload: Mapping[str, Any]) -> Calibration:
    """The calibration kept in a checkpoint's payload, or one line saying how to add it."""
    if "calibration" not in payload:
        raise CheckpointError(f"checkpoint '{path}' has no calibration, so its scores have no fixed scale: run "
                              f"`moeclip calibrate {path} --manifest <the auxiliary dataset's manifest>`")
    return Calibration(**payload["calibration"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw payload; raises CheckpointError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {err}") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), int):
        raise CheckpointError(f"'{path}' is not a MoECLIP checkpoint (format {FORMAT_VERSION})")
    if payload["format"] != FORMAT_VERSION:
        why = OUTDATED.get(payload["format"], "a format this version does not know")
        raise OutdatedCheckpointError(f"checkpoint '{path}' has format {payload['format']}, this version reads "
                                      f"format {FORMAT_VERSION} ({why}): retrain it")
    return payload


def load_model(path: Path, device: str | torch.device = "cpu",
               test_time: Mapping[str, Any] | None = None) -> tuple[ZeroShotMethod, dict[str, Any]]:
    """Rebuild the method a checkpoint was trained with and load its weights; returns (model in eval mode, payload).

    `test_time` overrides model fields that act only at inference (router noise, blur), so one
    training serves every test-time variant of an experiment.
    """
    payload = read_checkpoint(path)
    try:  # checkpoints written before the baselines existed hold MoECLIP
        config = method_config(payload.get("method", "moeclip"), {**payload["model_config"], **(test_time or {})})
    except UnknownMethodError as err:
        raise CheckpointError(f"checkpoint '{path}': {err}") from None
    model = build_method(config, seed=payload["build_seed"])
    missing, unexpected = model.load_state_dict(payload["weights"], strict=False)
    missing = [k for k in missing if not k.startswith("clip.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{path}' does not fit its model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), payload
