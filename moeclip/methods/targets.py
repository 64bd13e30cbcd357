"""What a training step compares a method's outputs with: the same for every method, built once per batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """One training batch's ground truth on the device: (B, H, W) 0/1 masks, (B,) labels, (B,) mask-known flags."""

    masks: torch.Tensor
    labels: torch.Tensor
    known: torch.Tensor
