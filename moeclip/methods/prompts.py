"""The hand-written prompt ensembles of WinCLIP and April-GAN (../shared/BASELINES.md 1c, 2c) and AdaCLIP's, and the
placeholder word of learnable context tokens (MoECLIP's learnable prompts, AnomalyCLIP, WMoE-CLIP).

A prompt is `template.format(state.format(name))` for every state and template, state-major
within each template list as the reference code orders them (the order does not change a mean).
"""
from __future__ import annotations

from collections.abc import Sequence

# A learnable context token's word in a prompt: its token embedding is replaced by a learned vector.
CONTEXT_PLACEHOLDER = "X"

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
APRIL_GAN_ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")

# anomalib's list (21 entries, its duplicate of the jpeg template kept: the mean counts it twice).
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)
APRIL_GAN_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a photo of the small {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# AdaCLIP's text branch: April-GAN's states with the first four of its templates.
ADACLIP_TEMPLATES = APRIL_GAN_TEMPLATES[:4]


def ensemble(name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every state x template prompt around `name`."""
    return [template.format(state.format(name)) for state in states for template in templates]
