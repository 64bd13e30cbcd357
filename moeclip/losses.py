"""Auxiliary expert losses (SPEC 3): simplex-ETF (Eqs. 3, 7, 8) and load balance (Eq. 9, B.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def etf_target(num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """Ideal Gram matrix of a simplex ETF (Eq. 3): 1 on the diagonal, -1/(K-1) elsewhere."""
    off = -1.0 / (num_experts - 1)
    target = torch.full((num_experts, num_experts), off, device=device)
    return target.fill_diagonal_(1.0)


def _unit_outputs(expert_outputs: torch.Tensor) -> torch.Tensor:
    """(..., K, d) expert outputs -> (tokens, K, d) L2-normalised, in float32."""
    return F.normalize(expert_outputs.float().flatten(0, -3), dim=-1)


def _gram(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrix of the normalised expert outputs (Eq. 7): (tokens, K, K)."""
    unit = _unit_outputs(expert_outputs)
    return unit @ unit.transpose(-1, -2)


def etf_loss(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and the K*K entries of (G - G_ideal)^2 (Eq. 8, one layer).

    `expert_outputs` is (tokens, K, d) (any leading dims are flattened into tokens).
    Zero for K = 1, and zero at an exact simplex ETF.
    """
    num_experts = expert_outputs.shape[-2]
    if num_experts == 1:
        return expert_outputs.new_zeros((), dtype=torch.float32)
    gram = _gram(expert_outputs)
    return (gram - etf_target(num_experts, gram.device)).pow(2).mean()


def balance_loss(router_probs: torch.Tensor, unbiased: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """CV^2 of the expert load B = sum over tokens of the full routing probabilities (Eq. B.1, one layer).

    `router_probs` is (tokens, K). The paper writes sigma^2 without saying which estimator;
    the default is the population variance, `unbiased=True` gives the release's (n-1) variance.
    """
    load = router_probs.float().flatten(0, -2).sum(dim=0)
    return load.var(unbiased=unbiased) / (load.mean().pow(2) + eps)


def expert_cosine_loss(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Table 10 'similarity constraint': mean pairwise cosine between different experts' outputs."""
    num_experts = expert_outputs.shape[-2]
    if num_experts == 1:
        return expert_outputs.new_zeros((), dtype=torch.float32)
    gram = _gram(expert_outputs)
    off_diagonal = gram.sum(dim=(-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal.mean() / (num_experts * (num_experts - 1))


def expert_contrastive_loss(expert_outputs: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Table 10 'contrastive constraint' (InfoNCE over experts).

    For token t and expert n the positive is expert n's output on the next token; the
    negatives are the other experts' outputs on token t. Pulls each expert towards a
    consistent function and pushes experts apart.
    """
    unit = _unit_outputs(expert_outputs)  # (T, K, d)
    num_experts = unit.shape[1]
    if num_experts == 1 or unit.shape[0] < 2:
        return unit.new_zeros(())
    positive = (unit * unit.roll(-1, dims=0)).sum(-1, keepdim=True)  # (T, K, 1)
    same_token = unit @ unit.transpose(1, 2)  # (T, K, K)
    others = same_token.masked_select(~torch.eye(num_experts, dtype=torch.bool, device=unit.device))
    logits = torch.cat([positive, others.view(-1, num_experts, num_experts - 1)], dim=-1) / temperature
    return F.cross_entropy(logits.flatten(0, 1), torch.zeros(logits.shape[0] * num_experts, dtype=torch.long,
                                                             device=unit.device))


# The focal loss's smoothing s: the paper's Eq. B.3 has none (a floor of 1e-8 only guards log 0); the authors'
# release (its FocalLoss(smooth=1e-5), SPEC.md section 11), April-GAN and AnomalyCLIP clamp the one-hot target
# to [s, 1 - s] and add s to p_t, so that -log p_t stays below -log(2s), about 10.8.
FOCAL_SMOOTHING = {"paper": 0.0, "release": 1e-5}


def _focal_terms(probs: torch.Tensor, mask: torch.Tensor, gamma: float, smoothing: float) -> torch.Tensor:
    """Per pixel -(1 - p_t)^gamma log p_t: (..., 2, H, W) probs, (..., H, W) mask -> (..., H, W).

    Without smoothing p_t is the true class's probability (floored at 1e-8); with smoothing s it is
    sum_c clamp(onehot_c, s, 1 - s) p_c + s.
    """
    normal, anomalous = probs[..., 0, :, :], probs[..., 1, :, :]
    if smoothing:
        weight = mask.float().clamp(smoothing, 1 - smoothing)
        p_true = (1 - weight) * normal + weight * anomalous + smoothing
    else:
        p_true = torch.where(mask > 0.5, anomalous, normal).clamp_min(1e-8)
    return -(1 - p_true).pow(gamma) * p_true.log()


def _focal_per_map(probs: torch.Tensor, mask: torch.Tensor, gamma: float, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over pixels of the focal terms (`_focal_terms`): (..., 2, H, W) probs, (..., H, W) mask -> (...)."""
    return _focal_terms(probs, mask, gamma, smoothing).mean(dim=(-2, -1))


# Dice's smoothing (a, b) in 1 - (2 sum(y p) + a) / (sum(y) + sum(p) + b): the paper's formula (B.4)
# has none (a tiny b only guards 0/0), the authors' release adds 1 to both.
DICE_SMOOTHING = {"paper": (0.0, 1e-6), "release": (1.0, 1.0)}


def _dice(pred: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...], kind: str = "paper") -> torch.Tensor:
    """1 - (2 sum(y p) + a) / (sum(y) + sum(p) + b), the sums over `dims`, (a, b) = DICE_SMOOTHING[kind].

    Paper: with an empty mask the anomaly channel's term is 1 whatever p is (no gradient);
    release: an empty mask still pushes the anomaly channel down.
    """
    numerator_smoothing, denominator_smoothing = DICE_SMOOTHING[kind]
    overlap = (pred * target).sum(dim=dims)
    return 1 - (2 * overlap + numerator_smoothing) / (pred.sum(dim=dims) + target.sum(dim=dims) + denominator_smoothing)


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Eq. B.3 on 2-channel maps: mean over pixels of -(1 - p_t)^gamma log p_t, p_t the true class's probability.

    `probs` is (B, 2, H, W) = [normal, anomalous]; `mask` is (B, H, W) in {0, 1}.
    """
    return _focal_per_map(probs, mask, gamma).mean()


def clamped_focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0,
                       clamp: float = 1e-5) -> torch.Tensor:
    """April-GAN's and AnomalyCLIP's focal loss (BASELINES.md 2e): the one-hot target clamped to
    [clamp, 1 - clamp], p_t = sum_c target_c p_c + clamp, mean over all pixels of -(1 - p_t)^gamma log p_t.

    `probs` is (B, 2, H, W) = [normal, anomalous] probabilities; `mask` is (B, H, W) in {0, 1}.
    """
    return _focal_terms(probs, mask, gamma, clamp).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "paper") -> torch.Tensor:
    """Eq. B.4 per image, averaged over the batch (see `_dice` for `kind`); (B, ...) inputs."""
    return _dice(pred, target, tuple(range(1, pred.dim())), kind).mean()


def mean_over_known(per_sample: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The mean of (B,) per-sample losses over the samples whose (B,) `known` flag is true, 0 if none: every
    method's rule for masks it does not know (an unknown mask read as empty would teach that defects are normal).
    A weighting, so no step waits for the device to say which samples are known."""
    weight = known.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1)


def segmentation_loss(maps: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0,
                      known: torch.Tensor | None = None, dice: str = "paper", focal: str = "paper") -> torch.Tensor:
    """L_seg (Eq. 15): sum over the M maps of Focal + Dice(anomalous, mask) + Dice(normal, 1 - mask).

    `maps` is (B, M, 2, H, W) softmax output (Eq. 12); `mask` is (B, H, W). Each term is a
    mean over the batch, restricted to the samples where the bool (B,) `known` is true (all
    by default; 0 if none). All maps and samples are computed at once, and the restriction is
    a weighting, so no step waits for the device to say which samples are known. `dice` picks the
    Dice formula (`_dice`), `focal` the focal loss's smoothing (FOCAL_SMOOTHING).
    """
    probs, target = maps.float(), mask.float().unsqueeze(1)  # (B, M, 2, H, W), (B, 1, H, W)
    pixels = (-2, -1)
    per_map = (_focal_per_map(probs, target, gamma, FOCAL_SMOOTHING[focal])
               + _dice(probs[:, :, 1], target, pixels, dice)
               + _dice(probs[:, :, 0], 1 - target, pixels, dice))  # (B, M)
    per_sample = per_map.sum(dim=1)
    return mean_over_known(per_sample, torch.ones_like(per_sample) if known is None else known)


def classification_loss(similarities: torch.Tensor, labels: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """L_ac from the image similarities (B, 2) = [s_N, s_A] (cosines, or the release's dot products).

    'bce' (paper, Eq. 15): binary cross-entropy of S_A = (s_A + 1) / 2 against the label;
    'cross_entropy' (release): 2-way cross-entropy on the raw similarities, unscaled.
    """
    if kind == "bce":
        score = ((similarities[:, 1].float() + 1) / 2).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(score, labels.float())
    if kind == "cross_entropy":
        return F.cross_entropy(similarities.float(), labels.long())
    raise ValueError(f"unknown classification loss '{kind}' (bce or cross_entropy)")
