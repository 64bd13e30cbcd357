"""Frozen CLIP backbone through open_clip: any ViT config, any input size, any weights source.

open_clip builds the model at the requested input size and, when it loads a
checkpoint trained at another size, bicubically resizes the grid part of the
visual positional embedding while keeping the CLS entry. We rely on that path
for both the `openai` tag and local checkpoint files.
"""
from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg

from moeclip.errors import MoeclipError

TINY_BACKBONE = "MoECLIP-Tiny-ViT"
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)


class WeightsUnavailableError(MoeclipError):
    """CLIP weights could not be loaded; the message says what to download and where to put it."""


def _download_hint(backbone: str, tag: str) -> str:
    cfg = get_pretrained_cfg(backbone, tag) or {}
    sources = [s for s in (cfg.get("url"), cfg.get("hf_hub") and f"https://huggingface.co/{cfg['hf_hub']}") if s]
    where = " or ".join(sources) if sources else "the model's release page"
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (
        f"Could not load the '{tag}' weights of {backbone} (offline, or the download failed). "
        f"Download them on a connected machine from {where}; then either put the file's path in "
        f"params.yaml (model.weights: /path/to/file.pt) or pre-populate the Hugging Face cache ({cache}) "
        f"and unset HF_HUB_OFFLINE."
    )


def load_clip(
    backbone: str,
    image_size: int,
    weights: str | None,
    quick_gelu: bool = True,
    device: str = "cpu",
) -> torch.nn.Module:
    """Create an open_clip CLIP model at `image_size` with frozen weights.

    `weights` is an open_clip pretrained tag (e.g. 'openai'), a checkpoint file,
    or None for random initialisation (tests, demo, timing). `device="meta"` (with no weights)
    gives the architecture without allocating or initialising its tensors.
    """
    if backbone not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model '{backbone}'. Known ViTs include: "
                         f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))[:400]}")
    is_tag = weights is not None and get_pretrained_cfg(backbone, weights) is not None
    source = weights
    if weights is not None and not is_tag:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"CLIP checkpoint '{path}' does not exist. Put the weights of {backbone} there, "
                f"or set model.weights to 'openai' (download) or null (random init)."
            )
        source = str(path)
    try:
        model = open_clip.create_model(
            backbone,
            pretrained=source,
            force_image_size=image_size,
            force_quick_gelu=quick_gelu,
            device=device,
        )
    except Exception as err:  # open_clip raises RuntimeError, torch.load unpickling errors
        if weights is None:
            raise
        if is_tag:
            raise WeightsUnavailableError(_download_hint(backbone, weights)) from err
        raise WeightsUnavailableError(f"Could not load CLIP checkpoint '{source}' into {backbone}: {err}") from err
    model.eval()
    model.requires_grad_(False)
    return model


def tokenizer_for(backbone: str):
    """open_clip's tokenizer for `backbone` (the BPE vocabulary ships with open_clip, so it works offline)."""
    return open_clip.get_tokenizer(backbone)


def default_moe_layers(backbone: str) -> tuple[int, ...]:
    """MoE after every quarter of the ViT's depth: (6, 12, 18, 24) for a 24-block ViT-L."""
    depth = open_clip.get_model_config(backbone)["vision_cfg"]["layers"]
    if depth < 4:
        return tuple(range(1, depth + 1))
    return tuple(depth * q // 4 for q in (1, 2, 3, 4))
