"""Patch Average Aggregation (Eq. 10): parameter-free multi-scale context on the patch grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_average(tokens: torch.Tensor, grid: tuple[int, int] | int, scale: int) -> torch.Tensor:
    """Mean over an s x s window centred on each patch of (B, L, C) patch tokens (CLS excluded).

    Stride 1, zero padding, divisor s^2 at the borders too (as the authors' release does).
    """
    if scale < 1 or scale % 2 == 0:
        raise ValueError(f"PAA scale must be a positive odd integer, got {scale}")
    height, width = (grid, grid) if isinstance(grid, int) else grid
    length = tokens.shape[1]
    if length != height * width:
        raise ValueError(f"{length} tokens do not form a {height}x{width} grid")
    if scale == 1:
        return tokens
    # (B, L, C) viewed as a channels-last (B, C, H, W) image: pooling then needs no transposed copies.
    image = tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(image, scale, stride=1, padding=scale // 2, count_include_pad=True)
    return pooled.permute(0, 2, 3, 1).flatten(1, 2)
