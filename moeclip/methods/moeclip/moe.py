"""Mixture of LoRA experts in the residual stream of a frozen ViT block (SPEC 2, Eqs. 1, 2, 4, 5, 6)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeclip.config import MoESettings
from moeclip.methods.precision import float32


def fofs_chunk_sizes(d: int, num_experts: int) -> list[int]:
    """Contiguous chunk sizes of the d input dims; they differ by at most one, earlier chunks take the remainder."""
    base, remainder = divmod(d, num_experts)
    return [base + 1 if n < remainder else base for n in range(num_experts)]


def fofs_matrices(d: int, K: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:  # noqa: N803
    """Frozen Orthogonal Feature Separation (Eq. 6): A of shape (K, r, d).

    A_n is zero outside chunk n; inside it holds Q_n = qr(C_n).Q^T with C_n ~ N(0, 1) of
    shape (d_n, r). Hence A_n A_m^T = 0 for n != m and A_n A_n^T = I_r. (The argument
    names follow the paper's symbols, as the public API promises.)
    """
    sizes = fofs_chunk_sizes(d, K)
    if min(sizes) < r:
        raise ValueError(f"FOFS needs every chunk (smallest {min(sizes)} of d={d} split {K} ways) "
                         f"to have at least rank={r} dims")
    matrices = torch.zeros(K, r, d)
    start = 0
    for n, size in enumerate(sizes):
        gaussian = torch.randn(size, r, generator=generator)
        q, _ = torch.linalg.qr(gaussian)  # (d_n, r), orthonormal columns
        matrices[n, :, start:start + size] = q.T
        start += size
    return matrices


def kaiming_lora_a(d: int, num_experts: int, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ordinary trainable LoRA A init (kaiming-uniform with a=sqrt(5), as nn.Linear), used without FOFS."""
    bound = 1.0 / math.sqrt(d)  # kaiming_uniform(a=sqrt(5)) on fan_in=d reduces to U(-1/sqrt(d), 1/sqrt(d))
    return (torch.rand(num_experts, rank, d, generator=generator) * 2 - 1) * bound


@dataclass
class Routing:
    """Router output for a set of tokens: full probabilities and the renormalised top-k choice."""

    probs: torch.Tensor  # (..., K) float32 softmax over all experts (balance loss, utilisation)
    topk_index: torch.Tensor  # (..., k) chosen experts
    topk_weight: torch.Tensor  # (..., k) renormalised to sum to 1 (Eq. 1)

    def dense_weights(self) -> torch.Tensor:
        """R_hat of Eq. 1 as a (..., K) tensor: zero for unselected experts."""
        weights = torch.zeros_like(self.probs)
        return weights.scatter(-1, self.topk_index, self.topk_weight)


class Router(nn.Module):
    """Bias-free linear (or MLP, Table 10) router d -> K, zero-initialised so routing starts uniform."""

    def __init__(self, d: int, num_experts: int, top_k: int, kind: str = "linear", hidden: int = 256,
                 noise: float = 0.0) -> None:
        super().__init__()
        self.top_k = top_k
        self.noise = noise
        if kind == "linear":
            self.net = nn.Linear(d, num_experts, bias=False)
            last = self.net
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, num_experts, bias=False))
            last = self.net[-1]
        else:
            raise ValueError(f"unknown router kind '{kind}' (linear or mlp)")
        nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        # In float32 even under bf16 autocast (whose weights are float32): bf16 logits would
        # flip the top-k choice of nearly tied experts.
        if torch.is_autocast_enabled(x.device.type):
            with float32(x):
                logits = self.net(x.float())
        else:  # also a router cast to bf16 as a whole (no autocast): its own dtype, then float32
            logits = self.net(x).float()
        if self.noise > 0 and not self.training:
            # Table 11: adaptive noise N(0, (alpha * sigma)^2), sigma = std of each token's K logits.
            sigma = logits.std(dim=-1, keepdim=True, unbiased=False)
            logits = logits + torch.randn_like(logits) * (self.noise * sigma)
        probs = logits.softmax(dim=-1)
        top_probs, top_index = probs.topk(self.top_k, dim=-1)
        top_weight = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return Routing(probs=probs, topk_index=top_index, topk_weight=top_weight)


@dataclass
class MoEAux:
    """What the losses and analyses need from one MoE layer."""

    routing: Routing
    expert_outputs: torch.Tensor | None  # (..., K, d) unmixed E_n(x); only when computed densely


class MoEAdapter(nn.Module):
    """One MoE layer: router, K experts, norm matching (Eq. 4) and weighted residual (Eq. 5).

    Dense mode (training) evaluates every expert for every token, because the ETF loss
    needs all K outputs. Sparse mode (inference) never materialises the K outputs: each
    token's rank-r codes of the unselected experts are zeroed and one (K*r -> d) product
    mixes the selected experts, with no host synchronisation or per-expert loop.
    """

    def __init__(self, d: int, settings: MoESettings, generator: torch.Generator | None = None) -> None:
        super().__init__()
        num_experts, rank = settings.num_experts, settings.rank
        self.num_experts, self.rank = num_experts, rank
        self.scale = settings.alpha / rank
        self.lambda_moe, self.eps = settings.lambda_moe, settings.eps
        self.expert_type = settings.expert_type
        self.router = Router(d, num_experts, settings.top_k, settings.router_type, settings.router_hidden,
                             settings.router_noise)
        self.dropout = nn.Dropout(settings.dropout)
        if settings.expert_type == "lora":
            init_a = fofs_matrices if settings.fofs else kaiming_lora_a
            self.lora_a = nn.Parameter(init_a(d, num_experts, rank, generator), requires_grad=not settings.fofs)
            self.lora_b = nn.Parameter(torch.zeros(num_experts, d, rank))
        elif settings.expert_type == "full_rank":
            self.full = nn.Parameter(torch.zeros(num_experts, d, d))
        else:
            raise ValueError(f"unknown expert type '{settings.expert_type}' (lora or full_rank)")

    def _per_expert(self, x: torch.Tensor) -> torch.Tensor | None:
        """In training with dropout: x once per expert, (..., K, d), each copy with its own dropout mask
        (as K independent LoRA modules draw them). Otherwise None: every expert reads x itself."""
        if not (self.training and self.dropout.p > 0):
            return None
        return self.dropout(x.unsqueeze(-2).expand(*x.shape[:-1], self.num_experts, x.shape[-1]))

    def _lora_codes(self, x: torch.Tensor) -> torch.Tensor:
        """A_n dropout_n(x) for every expert n: (..., K, r)."""
        a = self.lora_a.to(x.dtype)
        dropped = self._per_expert(x)
        if dropped is not None:
            return torch.einsum("...kj,krj->...kr", dropped, a)
        return F.linear(x, a.reshape(self.num_experts * self.rank, -1)).unflatten(-1, (self.num_experts, self.rank))

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """All K expert outputs E_n(x) of shape (..., K, d) (dense path)."""
        if self.expert_type == "full_rank":
            dropped = self._per_expert(x)
            if dropped is not None:
                return torch.einsum("...kj,kdj->...kd", dropped, self.full.to(x.dtype))
            return torch.einsum("...j,kdj->...kd", x, self.full.to(x.dtype))
        return torch.einsum("...kr,kdr->...kd", self._lora_codes(x), self.lora_b.to(x.dtype)) * self.scale

    def sparse_mixture(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_n R_hat_n E_n(x) without forming the K outputs; `weights` is zero off the top-k.

        Full-rank experts (a Table 10 ablation) have no low-rank codes to mask, so all K are computed.
        """
        if self.expert_type == "full_rank":
            return torch.einsum("...k,...kd->...d", weights.to(x.dtype), self.expert_outputs(x))
        mixed_codes = (self._lora_codes(x) * weights.to(x.dtype).unsqueeze(-1)).flatten(-2)  # (..., K*r)
        b_cat = self.lora_b.to(x.dtype).permute(1, 0, 2).reshape(-1, self.num_experts * self.rank)  # (d, K*r)
        return F.linear(mixed_codes, b_cat) * self.scale

    def forward(self, x: torch.Tensor, dense: bool | None = None) -> tuple[torch.Tensor, MoEAux]:
        dense = self.training if dense is None else dense
        routing = self.router(x)
        weights = routing.dense_weights()
        if dense:
            outputs = self.expert_outputs(x)
            mixed = torch.einsum("...k,...kd->...d", weights.to(outputs.dtype), outputs)
        else:
            outputs = None
            mixed = self.sparse_mixture(x, weights)
        return self.residual(x, mixed), MoEAux(routing=routing, expert_outputs=outputs)

    def residual(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """Eq. 4 (per-token norm matching, in float32) then Eq. 5 (weighted residual)."""
        x32, mixed32 = x.float(), mixed.float()
        normed = mixed32 * (x32.norm(dim=-1, keepdim=True) / (mixed32.norm(dim=-1, keepdim=True) + self.eps))
        return (self.lambda_moe * normed + (1 - self.lambda_moe) * x32).to(x.dtype)
