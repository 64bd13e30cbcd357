"""MoECLIP, one method among the others (moeclip/methods/base.py): LoRA experts in a frozen CLIP ViT, PAA, heads."""
from moeclip.methods.moeclip.moe import MoEAdapter, Router, fofs_matrices
from moeclip.methods.moeclip.network import MoECLIP, VisionOutput, build_model, count_parameters
from moeclip.methods.moeclip.paa import patch_average

__all__ = ["MoEAdapter", "MoECLIP", "Router", "VisionOutput", "build_model", "count_parameters", "fofs_matrices",
           "patch_average"]
