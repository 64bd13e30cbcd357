"""MoECLIP: patch-specialised LoRA experts in a frozen CLIP ViT for zero-shot anomaly detection."""
from moeclip.config import ModelConfig
from moeclip.model import MoECLIP, build_model

__all__ = ["MoECLIP", "ModelConfig", "build_model"]
