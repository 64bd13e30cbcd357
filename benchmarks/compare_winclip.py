"""Our WinCLIP (moeclip/methods/winclip.py) against anomalib's torch model on the same weights and inputs.

    python benchmarks/compare_winclip.py --official /path/to/anomalib   # a checkout (or its src/ folder)

anomalib's `WinClipModel` is imported from the checkout's files, not copied. Its heavy package imports
(lightning, the data classes) are replaced at runtime by small stand-ins: `InferenceBatch` becomes a plain
record and the buffer-list mixin a plain attribute; nothing of the algorithm is touched. It loads its CLIP with
`open_clip.create_model_and_transforms(BACKBONE, pretrained=PRETRAINED)`; PRETRAINED is set to None (no
download) and our model's random weights are then copied into it, so both run the same network.

anomalib pins open_clip < 2.26.1, where the ViT's transformer took sequence-first input, and permutes its
window batch to (L, N, D) before the transformer. open_clip 3.3.0 is batch-first, so on this version that
permute silently makes the windows attend across each other (../shared/BASELINES.md section 0, pitfall 2). The
script runs anomalib twice: as written, and with the permute neutralised by switching the ViT transformer to
`batch_first=False` during the window pass only (it then transposes back, exactly the old interface).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from moeclip.methods.winclip import WinCLIP, WinCLIPConfig

WINCLIP_PACKAGE = "anomalib.models.image.winclip"


@dataclass
class InferenceBatch:
    """Stand-in for anomalib.data.InferenceBatch (the two fields WinClipModel.forward fills)."""

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor


class BufferListMixin:
    """Stand-in for anomalib's buffer-list mixin: the list is kept as a plain attribute (device moves are not
    needed here, everything runs on the CPU)."""

    def register_buffer_list(self, name: str, values: list[torch.Tensor], persistent: bool = True) -> None:
        del persistent
        object.__setattr__(self, name, list(values))


class DynamicBufferMixin:
    """Stand-in for anomalib's mixin that resizes buffers when loading a state dict (not used here)."""


def source_folder(official: Path) -> Path:
    """The folder of anomalib's WinCLIP files in a checkout or in its src/ folder."""
    for root in (official / "src", official):
        folder = root / "anomalib" / "models" / "image" / "winclip"
        if (folder / "torch_model.py").is_file():
            return folder
    raise SystemExit(f"no anomalib/models/image/winclip/torch_model.py under {official}")


def import_official(folder: Path) -> types.ModuleType:
    """anomalib's torch_model module, its package parents replaced by empty namespaces and stand-ins."""
    parents = ["anomalib", "anomalib.data", "anomalib.models", "anomalib.models.components", "anomalib.models.image"]
    for name in parents:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = []
    sys.modules["anomalib.data"].InferenceBatch = InferenceBatch
    sys.modules["anomalib.models.components"].BufferListMixin = BufferListMixin
    sys.modules["anomalib.models.components"].DynamicBufferMixin = DynamicBufferMixin
    package = types.ModuleType(WINCLIP_PACKAGE)  # its __init__ would import the lightning model
    package.__path__ = [str(folder)]
    sys.modules[WINCLIP_PACKAGE] = package
    return importlib.import_module(f"{WINCLIP_PACKAGE}.torch_model")


def official_model(module: types.ModuleType, ours: WinCLIP, class_name: str) -> torch.nn.Module:
    """anomalib's WinClipModel on our CLIP's weights (built without its pretrained download)."""
    module.BACKBONE, module.PRETRAINED = ours.config.backbone, None
    model = module.WinClipModel(scales=ours.config.window_sizes)
    model.clip.load_state_dict(ours.clip.state_dict())
    model.eval()
    model.setup(class_name)
    return model


def run_official(model: torch.nn.Module, images: torch.Tensor, neutralise_permute: bool) -> InferenceBatch:
    """anomalib's forward; with `neutralise_permute` its window pass sees the sequence-first interface it was
    written for (the ViT transformer transposes (L, N, D) back to batch-first and returns (L, N, D))."""
    transformer = model.clip.visual.transformer
    window_pass = model._get_window_embeddings

    def sequence_first(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        transformer.batch_first = False
        try:
            return window_pass(feature_map, masks)
        finally:
            transformer.batch_first = True

    model._get_window_embeddings = sequence_first if neutralise_permute else window_pass
    try:
        return model(images)
    finally:
        del model._get_window_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="an anomalib checkout (or its src/ folder)")
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--class-name", default="metal_nut")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    module = import_official(source_folder(args.official))
    config = WinCLIPConfig(backbone=args.backbone, image_size=args.image_size, weights=None, quick_gelu=False,
                           precision="fp32", class_text="folder", window_sizes=(2, 3), include_image_scale=True,
                           temperature=module.TEMPERATURE)
    start = time.perf_counter()
    ours = WinCLIP.build(config, seed=args.seed)
    official = official_model(module, ours, args.class_name)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        maps, scores = ours.predict(images, [args.class_name] * args.batch, "industrial")
        anchors_diff = (ours.text_anchors(args.class_name) - official.text_embeddings).abs().max().item()
        results = {"neutralised": run_official(official, images, True),
                   "as written": run_official(official, images, False)}
    print(f"{args.backbone} at {args.image_size} px, random weights (seed {args.seed}), batch {args.batch}, "
          f"class '{args.class_name}', anomalib TEMPERATURE={module.TEMPERATURE}, {time.perf_counter() - start:.0f} s")
    print(f"text anchors [t_n, t_a]: max |ours - anomalib| = {anchors_diff:.3g}")
    print(f"ours: scores {scores.tolist()}, map range [{maps.min():.6f}, {maps.max():.6f}]")
    for name, result in results.items():
        map_diff = (maps - result.anomaly_map).abs().max().item()
        score_diff = (scores - result.pred_score).abs().max().item()
        print(f"anomalib, permute {name}: max |map diff| = {map_diff:.3g}, max |score diff| = {score_diff:.3g}")


if __name__ == "__main__":
    main()
