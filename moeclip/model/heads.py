"""Trainable heads on the adapted patch tokens: per-layer projections (Eq. 11) and the depth-wise image
adapter (Eq. 13)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moeclip.model.precision import float32


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


class DepthwiseImageAdapter(nn.Module):
    """LN -> depthwise Conv1d over the token sequence (k=3, same) -> GELU -> pointwise Conv1d d -> D (Eq. 13).

    Both convolutions start xavier-uniform, as in the authors' release (the paper does not say).
    """

    def __init__(self, width: int, embed_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.depthwise = nn.Conv1d(width, width, kernel_size, padding="same", groups=width, bias=False)
        self.pointwise = nn.Conv1d(width, embed_dim, 1, bias=False)
        nn.init.xavier_uniform_(self.depthwise.weight)
        nn.init.xavier_uniform_(self.pointwise.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, d) patch tokens -> (B, L, D) pointwise outputs, one per patch (V_image is formed from them).

        In float32 even under bf16 autocast (0.2 % of the FLOPs): V_image alone decides S_A,
        and bf16 rounding here would reorder the image scores of nearly tied images.
        """
        with float32(tokens):
            hidden = F.gelu(self.depthwise(self.norm(tokens.float()).transpose(1, 2)))
            return self.pointwise(hidden).transpose(1, 2)
