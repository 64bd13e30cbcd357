"""Image and mask preprocessing (SPEC.md section 1) and training augmentation (section 7).

Why here: every dataset, whatever its file format (8/16-bit, grayscale, palette, RGBA, JPEG),
must reach the model as the same CLIP-normalised RGB tensor, and its mask as a binary map on
exactly the same pixel grid, also after random geometric augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from moeclip.data.manifest import load_mask

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageReadError(OSError):
    """An image or mask file that cannot be decoded; the message names the file."""


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn decoder failures into an ImageReadError that says which file is at fault."""
    try:
        yield
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image file {path}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.

    16/32-bit and float images are scaled so that the image's own maximum becomes 255 (medical
    scans rarely use the full 16-bit range); transparent pixels are composited onto black.
    """
    if image.mode in HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        scaled = values * (255.0 / peak) if peak > 0 else np.zeros_like(values)
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB."""
    with _reading(path), Image.open(path) as image:
        return to_rgb(image)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size; float (3, S, S) in [0, 1], not yet normalised."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Nearest resize of a boolean (H, W) mask to float (1, S, S) holding 0/1."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 0).float().unsqueeze(0)


def read_mask(path: Path, size: int) -> torch.Tensor:
    """Mask file -> float (1, S, S) of 0/1 (`> 0`, or `>= 128` for lossy JPEG masks)."""
    with _reading(path):
        return mask_to_tensor(load_mask(Path(path)), size)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std normalisation of a (3, H, W) tensor in [0, 1]."""
    return F.normalize(image, mean=list(CLIP_MEAN), std=list(CLIP_STD))


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of SPEC.md section 7; each operation fires with probability `p`."""

    p: float = 0.5
    degrees: float = 30.0
    translate: float = 0.15
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5


DEFAULT_AUGMENTATION = AugmentConfig()


def _coin(p: float, generator: torch.Generator | None) -> bool:
    """True with probability p."""
    return bool(torch.rand((), generator=generator) < p)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """A float drawn uniformly from [low, high)."""
    return float(low + (high - low) * torch.rand((), generator=generator))


def _geometry(
    image: torch.Tensor, mask: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation, translation and flips with one set of random parameters for image and mask.

    Rotation and translation are merged into a single affine warp so the image is resampled
    once; the mask uses nearest interpolation so it stays binary.
    """
    height, width = image.shape[-2:]
    angle = _uniform(-config.degrees, config.degrees, generator) if _coin(config.p, generator) else 0.0
    shift = [0, 0]
    if _coin(config.p, generator):
        shift = [round(_uniform(-config.translate, config.translate, generator) * extent) for extent in (width, height)]
    if angle or any(shift):
        warp = {"angle": angle, "translate": shift, "scale": 1.0, "shear": [0.0, 0.0], "fill": 0.0}
        image = F.affine(image, interpolation=InterpolationMode.BILINEAR, **warp)
        mask = F.affine(mask, interpolation=InterpolationMode.NEAREST, **warp)
    if _coin(config.p, generator):
        image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
    if _coin(config.p, generator):
        image, mask = F.vertical_flip(image), F.vertical_flip(mask)
    return image, mask


def _colour_jitter(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s], applied in that order."""
    image = F.adjust_brightness(image, _uniform(1 - config.brightness, 1 + config.brightness, generator))
    image = F.adjust_contrast(image, _uniform(1 - config.contrast, 1 + config.contrast, generator))
    return F.adjust_saturation(image, _uniform(1 - config.saturation, 1 + config.saturation, generator))


def augment(
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator | None = None,
    config: AugmentConfig = DEFAULT_AUGMENTATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment an un-normalised (3, S, S) image in [0, 1] and its (1, S, S) mask.

    Randomness comes from `generator`, or from the global torch RNG when it is None, so a
    caller that seeds either gets repeatable results.
    """
    image, mask = _geometry(image, mask, config, generator)
    if _coin(config.p, generator):
        image = _colour_jitter(image, config, generator)
    return image, mask
