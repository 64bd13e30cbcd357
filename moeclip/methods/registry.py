"""Every method the benchmark runs, by the name params.yaml's `methods` section and checkpoints use.

Adding a method = one module (a `ZeroShotMethod` subclass with its config class) listed here,
plus its entry in params.yaml.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from moeclip.errors import MoeclipError
from moeclip.methods.aa_clip import AAClip
from moeclip.methods.adaclip import AdaCLIP
from moeclip.methods.anomalyclip import AnomalyCLIP
from moeclip.methods.april_gan import AprilGAN
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.bayes_pfl import BayesPFL
from moeclip.methods.winclip import WinCLIP
from moeclip.methods.wmoe_clip import WMoECLIP
from moeclip.methods.moeclip.network import MoECLIP

METHODS: dict[str, type[ZeroShotMethod]] = {method.name: method
                                            for method in (MoECLIP, WinCLIP, AprilGAN, AnomalyCLIP, WMoECLIP, AdaCLIP,
                                                           AAClip, BayesPFL)}


class UnknownMethodError(MoeclipError):
    """A method name that no module implements."""


def method_class(name: str) -> type[ZeroShotMethod]:
    if name not in METHODS:
        raise UnknownMethodError(f"no method '{name}' (methods: {', '.join(METHODS)})")
    return METHODS[name]


def method_of(config: BaseModel) -> type[ZeroShotMethod]:
    """The method a config object configures (each method has its own config class)."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    raise UnknownMethodError(f"no method is configured by {type(config).__name__}")


def method_config(name: str, values: Mapping[str, Any]) -> BaseModel:
    """Validate a method's `model` settings (a params.yaml mapping or a checkpoint's stored config)."""
    return method_class(name).config_class.model_validate(dict(values))


def build_method(config: BaseModel, seed: int | None = None) -> ZeroShotMethod:
    """The method `config` configures, built (see `ZeroShotMethod.build`)."""
    return method_of(config).build(config, seed)
