"""The tests' networks: the demo profile's tiny random-weight ViT (from params.yaml, its one source), variants of it,
and a copy with every trainable tensor randomised, so experts, router and heads all contribute."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from moeclip import ModelConfig, build_model
from moeclip.methods.moeclip import MoEAdapter, MoECLIP
from moeclip.config import TrainConfig
from moeclip.bench.params import Profile, load_profile

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@functools.cache
def _profile(name: str) -> Profile:
    return load_profile(PARAMS, name)


def tiny_config(**overrides: object) -> ModelConfig:
    """The demo profile's network (4 blocks, width 64, 8 px patches at 64 px: an 8x8 grid), with `overrides`."""
    return ModelConfig.model_validate({**_profile("demo").model.model_dump(), **overrides})


def paper_config(**overrides: object) -> ModelConfig:
    """The paper profile's network (ViT-L-14-336 at 518 px with OpenAI weights), with `overrides`."""
    return ModelConfig.model_validate({**_profile("paper").model.model_dump(), **overrides})


def paper_training(**overrides: object) -> TrainConfig:
    """The paper profile's training settings, with `overrides`."""
    return TrainConfig.model_validate({**_profile("paper").train.model_dump(), **overrides})


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
    return MoEAdapter(d, paper_config(**model_fields).moe)
