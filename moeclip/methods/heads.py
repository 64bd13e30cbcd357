"""Per-layer segmentation projections on adapted patch tokens (MoECLIP's Eq. 11; WMoE-CLIP reuses them)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn



class SegmentationProjection(nn.Module):
    """Proj_l of one layer: a bias-free linear d -> D (xavier-uniform), shared by all PAA scales of the layer."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, embed_dim, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)


class SegmentationProjections(nn.ModuleDict):
    """Eq. 11 for every output layer at once: one batched matmul instead of a loop over layers.

    Keyed by layer number (state_dict keys `<layer>.linear.weight`); the output is
    L2-normalised per patch, after the release's optional LeakyReLU.
    """

    def __init__(self, layers: Sequence[int], width: int, embed_dim: int, activation: bool = False) -> None:
        super().__init__({str(layer): SegmentationProjection(width, embed_dim) for layer in layers})
        self.activation = activation

    def forward(self, tokens: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """(len(layers), ..., d) tokens, entry i projected by layer i's Proj -> (len(layers), ..., D) unit vectors.

        `layers` defaults to all layers in ascending order.
        """
        chosen = [self[str(layer)] for layer in layers] if layers is not None else list(self.values())
        weight = torch.stack([projection.linear.weight for projection in chosen])  # (n, D, d)
        projected = torch.bmm(tokens.flatten(1, -2), weight.transpose(1, 2)).unflatten(1, tokens.shape[1:-1])
        if self.activation:
            projected = F.leaky_relu(projected)
        return F.normalize(projected, dim=-1)
