"""How a method is computed: the fast path and the straightforward reference, on the same weights.

Both compute the same equations; they differ only in how:
- `bf16`: the matmuls of the frozen blocks, the experts and the segmentation projections
  autocast to bfloat16 (weights stay float32). The residual stream, router, text anchors,
  image adapter, maps, scores, losses and metrics stay float32, so results change by the
  rounding of those matmul outputs only.
- `sparse_experts`: at inference each token mixes only its top-k experts without forming
  the K outputs; the reference evaluates every expert and mixes them densely (a method with
  experts says how through `ZeroShotMethod.expert_dispatch`; the others have none).
- `fused_attention`: the frozen ViT's attention uses the fused scaled-dot-product kernels
  (flash / memory-efficient); the reference forces the math backend, which materialises
  the (B, heads, L, L) attention weights as the authors' release does. At inference
  nn.MultiheadAttention takes its native fast path, whose CUDA kernel dispatches to the
  fused kernels but whose CPU kernel always materialises the weights; on the CPU the fast
  path is therefore switched off, so attention goes through scaled_dot_product_attention.
The reference mode (`REFERENCE`) is what benchmarks divide by and what the equality tests
compare against.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pydantic import BaseModel

if TYPE_CHECKING:  # below the method interface: base.py may build on this module, not the reverse
    from moeclip.methods.base import ZeroShotMethod


@dataclass(frozen=True)
class Execution:
    """One way of computing the model (see the module docstring)."""

    bf16: bool = False
    sparse_experts: bool = True
    fused_attention: bool = True


REFERENCE = Execution(bf16=False, sparse_experts=False, fused_attention=False)


def fast_execution(device: str | torch.device) -> Execution:
    """The fastest path for `device` (what the benchmarks time): bf16 on CUDA; float32 on the CPU,
    where bf16 matmuls are emulated (slower than float32) on processors without bf16 units."""
    return Execution(bf16=torch.device(device).type == "cuda")


def model_execution(config: BaseModel) -> Execution:
    """How training and evaluation compute a method: the fast path at the precision its config names."""
    return Execution(bf16=config.precision == "bf16")


@contextlib.contextmanager
def executing(model: ZeroShotMethod, how: Execution, device_type: str) -> Iterator[None]:
    """Run `model` the way `how` says inside this block: autocast, attention kernels, expert dispatch."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    if how.fused_attention and device_type == "cpu":
        torch.backends.mha.set_fastpath_enabled(False)
    attention = contextlib.nullcontext() if how.fused_attention else sdpa_kernel([SDPBackend.MATH])
    try:
        with model.expert_dispatch(how.sparse_experts), \
                torch.autocast(device_type, dtype=torch.bfloat16, enabled=how.bf16), attention:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def compile_backbone(model: ZeroShotMethod, **options: Any) -> ZeroShotMethod:
    """torch.compile each frozen ViT block in place (optional; the weights and state_dict keys are unchanged).

    All blocks share one compiled graph. `options` go to torch.compile, e.g. mode="max-autotune"
    or mode="reduce-overhead" (CUDA graphs). The first call pays the compilation.
    """
    for block in model.clip.visual.transformer.resblocks:
        block.compile(**options)
    return model
