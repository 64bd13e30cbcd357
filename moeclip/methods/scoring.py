"""Anomaly maps and scores from projected patch features and text anchors (SPEC 6, Eqs. 12, 14).

All functions are batched over maps (layers x PAA scales) so one call handles the 12
maps of the default model. They compute in float32 even inside a bf16 autocast region:
the logits are scaled by 100, so bf16 products would cost ~0.4 logit of rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from moeclip.config import BlurConfig, Domain
from moeclip.methods.precision import float32


def similarity_logits(patches: torch.Tensor, anchors: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """scale * cos(V, [T_N, T_A]): (B, M, L, D) unit patches, (B, 2, D) anchors -> (B, M, 2, L).

    Computed as (M, B, L, D) @ (B, D, 2): the encoder stores the patches maps-major, so this
    broadcast matmul reads them in place instead of copying the largest tensor of the forward.
    """
    with float32(patches):
        per_map = torch.matmul(patches.transpose(0, 1).float(), F.normalize(anchors.float(), dim=-1).transpose(1, 2))
    return scale * per_map.permute(1, 0, 3, 2)


def _to_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return values.unflatten(-1, grid)


def training_maps(logits: torch.Tensor, grid: tuple[int, int], image_size: int) -> torch.Tensor:
    """Eq. 12: bilinear upsample of the 2-channel logits, softmax over channels -> (B, M, 2, H, W)."""
    batch, maps = logits.shape[:2]
    grids = _to_grid(logits, grid).flatten(0, 1)  # (B*M, 2, h, w)
    upsampled = F.interpolate(grids, size=(image_size, image_size), mode="bilinear", align_corners=True)
    return upsampled.softmax(dim=1).unflatten(0, (batch, maps))


def anomaly_map(logits: torch.Tensor, grid: tuple[int, int], image_size: int, blur: BlurConfig) -> torch.Tensor:
    """Per map (logit_A + 1 - logit_N) / 2, Gaussian blur on the grid, bilinear upsample, sum over maps -> (B, H, W)."""
    per_map = (logits[:, :, 1] + 1 - logits[:, :, 0]) / 2  # (B, M, L)
    with float32(logits):
        grids = gaussian_blur(_to_grid(per_map, grid), [blur.kernel_size] * 2, [blur.sigma] * 2)
    upsampled = F.interpolate(grids, size=(image_size, image_size), mode="bilinear", align_corners=True)
    return upsampled.sum(dim=1)


def image_embedding(patch_outputs: torch.Tensor, kind: str) -> torch.Tensor:
    """V_image from (B, L, D) per-patch outputs: their mean (paper, Eq. 13), or the mean of the
    L2-normalised outputs (release)."""
    with float32(patch_outputs):
        outputs = patch_outputs.float()
        return (outputs if kind == "paper" else F.normalize(outputs, dim=-1)).mean(dim=1)


def image_similarities(embedding: torch.Tensor, anchors: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, 2) [s_N, s_A] of (B, D) V_image with (B, 2, D) unit anchors [T_N, T_A].

    paper: cosines (Eq. 14); release: plain dot products with the (not re-normalised) V_image.
    """
    with float32(embedding):
        if kind == "paper":
            return F.cosine_similarity(embedding.float().unsqueeze(1), anchors.float(), dim=-1)
        return torch.einsum("bd,bkd->bk", embedding.float(), anchors.float())


def image_score(similarities: torch.Tensor) -> torch.Tensor:
    """Eq. 14: S_A = (s_A + 1) / 2 from (B, 2) [s_N, s_A]."""
    return (similarities[:, 1] + 1) / 2


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] over all elements; a constant tensor becomes zeros."""
    low, high = values.min(), values.max()
    if high <= low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def into_unit_range(values: torch.Tensor) -> torch.Tensor:
    """The release's per-class rule: min-max over all elements only if some value lies outside [0, 1]."""
    return min_max(values) if bool(values.min() < 0) or bool(values.max() > 1) else values


def per_class_protocol_scores(maps: torch.Tensor, scores: torch.Tensor,
                          domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark protocol's per-class normalisation over all N test images of one class (evaluation only:
    an image's values depend on the others; moeclip/calibration.py scores images alone).

    The (N, H, W) maps and, separately, the (N,) S_A are brought into [0, 1] by the release's
    rule (`into_unit_range`; the paper is silent): summed maps are min-max normalised, S_A
    (already in [0, 1]) is kept. Final image score: 0.5 * max(map) + 0.5 * S_A (industrial) or
    max(map) (medical).
    """
    maps, scores = into_unit_range(maps.float()), into_unit_range(scores.float())
    peak = maps.flatten(1).amax(dim=1)
    final = 0.5 * peak + 0.5 * scores if domain == "industrial" else peak
    return maps, final
