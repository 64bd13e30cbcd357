"""The tiny random-weight MoECLIP with every trainable tensor randomised, so experts, router and heads all contribute."""
from __future__ import annotations

import torch

from moeclip import ModelConfig, build_model
from moeclip.model import MoEAdapter, MoECLIP


def randomised(config: ModelConfig, seed: int = 0) -> MoECLIP:
    """`config` built with `seed`; the trainables (zero-initialised LoRA B and router) drawn from N(0, 0.2^2)."""
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def moe_adapter(d: int, **model_fields: object) -> MoEAdapter:
    """One MoE layer of width `d` whose settings are the paper's except `model_fields` (ModelConfig's names)."""
    return MoEAdapter(d, ModelConfig(**model_fields).moe)
