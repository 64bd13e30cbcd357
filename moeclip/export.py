"""The inference path as an ONNX graph: an image batch in, calibrated maps and scores out, for one class.

The text tower runs once, at export: the class's anchors [T_N, T_A] are constants of the graph, so
an exported model serves one kind of object (export again for another). Input `images`: (B, 3, S, S)
float32, resized to the model's size S and CLIP-normalised, as `model.inputs` prepares them; the
batch size is free. Outputs: `maps` (B, S, S) and `scores` (B,) on the checkpoint's calibrated 0-1
scale (moeclip/calibration.py), `raw_maps` and `raw_scores` (S_A). The graph comes from torch.export
(the TorchScript exporter has no ONNX form for PyTorch's fused attention, and TorchScript itself is
deprecated). The MoE layers export as they run: the router's top-k as dense gates that are zero off
the chosen experts. ONNX Runtime agrees with PyTorch to about 2e-5 on the raw maps and 3e-8 on the
scores (tests/test_export.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeclip.atomic import atomic_path
from moeclip.calibration import Calibration
from moeclip.checkpoint import load_model, read_calibration, read_checkpoint
from moeclip.config import Domain
from moeclip.methods.moeclip import MoECLIP

OUTPUTS = ("maps", "scores", "raw_maps", "raw_scores")
MAX_BATCH = 1024


class ExportedDetector(nn.Module):
    """A model, one class's anchors and the calibration: images -> calibrated maps and scores (and raw ones)."""

    def __init__(self, model: MoECLIP, description: str, calibration: Calibration, domain: Domain) -> None:
        super().__init__()
        self.model, self.calibration, self.domain = model, calibration, domain
        with torch.no_grad():
            self.register_buffer("anchors", model.text_anchors([description]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        anchors = self.anchors.expand(images.shape[0], -1, -1)
        raw_maps, raw_scores = self.model.predict_with_anchors(images, anchors, self.domain)
        return (self.calibration.maps(raw_maps), self.calibration.scores(raw_maps, raw_scores, self.domain),
                raw_maps, raw_scores)


def export_onnx(checkpoint: Path, description: str, domain: Domain, out: Path) -> Path:
    """Write `out` (.onnx): the calibrated checkpoint's detector for `description`; its metadata says what
    the graph expects and returns."""
    import onnx

    calibration = read_calibration(checkpoint, read_checkpoint(checkpoint))
    model, _ = load_model(checkpoint, "cpu")
    detector = ExportedDetector(model, description, calibration, domain).eval()
    size = model.config.image_size
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with atomic_path(out) as temporary:
        program = torch.onnx.export(detector, (torch.zeros(2, 3, size, size),), dynamo=True,
                                    input_names=["images"], output_names=list(OUTPUTS),
                                    dynamic_shapes=({0: batch},), verbose=False)
        graph = program.model_proto
        for key, value in {"moeclip.class": description, "moeclip.domain": domain, "moeclip.image_size": str(size),
                           "moeclip.input": "CLIP-normalised RGB, (batch, 3, size, size) float32",
                           "moeclip.image_threshold": str(calibration.image_threshold),
                           "moeclip.pixel_threshold": str(calibration.pixel_threshold)}.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, temporary)
    return out
