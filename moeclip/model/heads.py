"""Trainable heads on the adapted patch tokens: per-layer projections (Eq. 11) and the depth-wise image adapter (Eq. 13)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationProjection(nn.Module):
    """Bias-free linear d -> D (xavier-uniform), shared by all PAA scales of one layer; output L2-normalised."""

    def __init__(self, width: int, embed_dim: int, activation: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(width, embed_dim, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)
        self.activation = nn.LeakyReLU() if activation else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.activation(self.linear(tokens)), dim=-1)


class DepthwiseImageAdapter(nn.Module):
    """LN -> depthwise Conv1d over the token sequence (k=3, same) -> GELU -> pointwise Conv1d d -> D.

    Each output patch is L2-normalised and the mean over patches is V_image.
    """

    def __init__(self, width: int, embed_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.depthwise = nn.Conv1d(width, width, kernel_size, padding="same", groups=width, bias=False)
        self.pointwise = nn.Conv1d(width, embed_dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, d) patch tokens -> (B, D) image embedding."""
        hidden = F.gelu(self.depthwise(self.norm(tokens).transpose(1, 2)))
        patches = F.normalize(self.pointwise(hidden).transpose(1, 2), dim=-1)
        return patches.mean(dim=1)
