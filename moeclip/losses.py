"""Auxiliary expert losses (SPEC 3): simplex-ETF (Eqs. 3, 7, 8) and load balance (Eq. 9, B.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def etf_target(num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """Ideal Gram matrix of a simplex ETF (Eq. 3): 1 on the diagonal, -1/(K-1) elsewhere."""
    off = -1.0 / (num_experts - 1)
    target = torch.full((num_experts, num_experts), off, device=device)
    return target.fill_diagonal_(1.0)


def etf_loss(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and the K*K entries of (G - G_ideal)^2 (Eq. 8, one layer).

    `expert_outputs` is (tokens, K, d) (any leading dims are flattened into tokens).
    Zero for K = 1, and zero at an exact simplex ETF.
    """
    num_experts = expert_outputs.shape[-2]
    if num_experts == 1:
        return expert_outputs.new_zeros((), dtype=torch.float32)
    unit = F.normalize(expert_outputs.float().flatten(0, -3), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    return (gram - etf_target(num_experts, gram.device)).pow(2).mean()


def balance_loss(router_probs: torch.Tensor, unbiased: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """CV^2 of the expert load B = sum over tokens of the full routing probabilities (Eq. B.1, one layer).

    `router_probs` is (tokens, K). The paper writes sigma^2 without saying which estimator;
    the default is the population variance, `unbiased=True` gives the release's (n-1) variance.
    """
    load = router_probs.float().flatten(0, -2).sum(dim=0)
    return load.var(unbiased=unbiased) / (load.mean().pow(2) + eps)
