"""MoECLIP: patch-specialised LoRA experts in a frozen CLIP ViT for zero-shot anomaly detection.

The model names are resolved on first use so that light commands (`moeclip data ...`)
do not pay for importing torch and open_clip.
"""
from importlib import import_module

_EXPORTS = {"ModelConfig": "moeclip.config", "MoECLIP": "moeclip.methods.moeclip", "build_model": "moeclip.methods.moeclip"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeclip' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name]), name)
