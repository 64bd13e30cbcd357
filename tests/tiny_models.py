"""The tests' networks: the demo profile's tiny random-weight ViT (from params.yaml, its one source), variants of it,
and a copy with every trainable tensor randomised, so experts, router and heads all contribute."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from moeclip import ModelConfig, build_model
from moeclip.model import MoEAdapter, MoECLIP
from moeclip.params import load_profile

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@functools.cache
def _demo_model() -> ModelConfig:
    return load_profile(PARAMS, "demo").model


def tiny_config(**overrides: object) -> ModelConfig:
    """The demo profile's network (4 blocks, width 64, 8 px patches at 64 px: an 8x8 grid), with `overrides`."""
    return ModelConfig.model_validate({**_demo_model().model_dump(), **overrides})


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
