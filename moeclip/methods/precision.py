"""Float32 islands inside the fast path's bf16 autocast regions (see moeclip/methods/execution.py).

The few places where bf16 rounding would change a decision (router top-k, anchors, image
scores, maps) compute with autocast off, on float32 inputs.
"""
from __future__ import annotations

import torch


def float32(where: torch.Tensor | torch.device) -> torch.autocast:
    """Autocast switched off on the device of `where`: the block computes in its inputs' dtype."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return torch.autocast(device.type, enabled=False)
