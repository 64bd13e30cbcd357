"""MoECLIP model components."""
from moeclip.model.moe import MoEAdapter, Router, fofs_matrices
from moeclip.model.network import MoECLIP, VisionOutput, build_model, count_parameters
from moeclip.model.paa import patch_average

__all__ = ["MoEAdapter", "MoECLIP", "Router", "VisionOutput", "build_model", "count_parameters", "fofs_matrices",
           "patch_average"]
