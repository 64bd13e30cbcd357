"""MoECLIP's depth-wise image adapter (Eq. 13): the patch tokens that form V_image, and so S_A."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeclip.methods.precision import float32


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
