"""April-GAN (Chen, Han, Zhang; VAND 2023 zero-shot track), as ../shared/BASELINES.md section 2 describes the
official release (ByChelsea/VAND-APRIL-GAN).

A frozen CLIP ViT; one trainable linear map (width -> embed_dim, with bias) per tapped block turns that block's
raw residual-stream patch tokens into the joint space, where they are compared with hand-written prompt
ensembles. Per layer: 100 * cos(patch, [t_n, t_a]) -> grid -> bilinear upsampling (align_corners=True) ->
softmax over the two states; the map is the sum over layers of the anomalous channel. The image score comes from
CLIP's own image embedding alone (the map is not used in the zero-shot protocol).

Numerics: the frozen blocks and the projections follow `precision` (bf16 = autocast, as the release's fp16
autocast); text features, logits, maps and scores are computed in float32, the text once per class text.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.func import vmap

from moeclip.config import BackboneConfig, Domain
from moeclip.losses import clamped_focal_loss, dice_loss
from moeclip.methods.base import ClassText, ZeroShotMethod, class_texts
from moeclip.methods.targets import Targets
from moeclip.methods.prompts import (
    APRIL_GAN_ANOMALOUS_STATES,
    APRIL_GAN_TEMPLATES,
    NORMAL_STATES,
    ensemble,
)
from moeclip.methods.precision import float32
from moeclip.methods.scoring import similarity_logits, training_maps


class AprilGANConfig(BackboneConfig):
    """The `model` section of an April-GAN profile (every value from params.yaml)."""

    class_text: ClassText = Field(description="folder: raw class folder names, as the release prompts")
    feature_layers: tuple[int, ...] = Field(
        description="1-indexed blocks whose residual stream is tapped, strictly increasing: the release pairs "
                    "its i-th linear map with the i-th tapped block in depth order")
    logit_scale: float
    focal_gamma: float = Field(description="gamma of the training's focal loss (the release: 2)")

    @model_validator(mode="after")
    def _layers(self) -> AprilGANConfig:
        layers = self.feature_layers
        if not layers or layers[0] < 1 or any(b <= a for a, b in pairwise(layers)):
            raise ValueError(f"feature_layers must be strictly increasing 1-indexed blocks, got {layers}")
        return self


class AprilGAN(ZeroShotMethod):
    """April-GAN: frozen CLIP + one trainable linear projection per tapped block (BASELINES.md 2)."""

    name = "april_gan"
    config_class = AprilGANConfig

    def __init__(self, config: AprilGANConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        self.check_layers(config.feature_layers)
        visual = clip.visual
        width, embed_dim = visual.conv1.out_channels, visual.output_dim
        # PyTorch's default nn.Linear init, as the release (kaiming-uniform weights, uniform bias).
        self.projections = nn.ModuleList(nn.Linear(width, embed_dim) for _ in config.feature_layers)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- text -----------------------------------------------------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        return class_texts(batch, self.config.class_text)

    def _encode_states(self, text: str) -> torch.Tensor:
        """(2, D) [t_n, t_a] for one class text: per state list, the mean of the L2-normalised prompt
        embeddings, normalised again (the release's order of normalising and averaging)."""
        device = self.clip.text_projection.device
        rows = []
        with torch.no_grad(), float32(device):
            for states in (NORMAL_STATES, APRIL_GAN_ANOMALOUS_STATES):
                tokens = self.tokenizer(ensemble(text, states, APRIL_GAN_TEMPLATES)).to(device)
                prompts = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
                rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
        return torch.stack(rows)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) unit [t_n, t_a] per sample; each class text is encoded once (the text tower is frozen)."""
        for text in dict.fromkeys(texts):
            if text not in self._text_cache:
                self._text_cache[text] = self._encode_states(text)
        device = self.clip.text_projection.device
        return torch.stack([self._text_cache[text] for text in texts]).to(device)

    # -- vision ---------------------------------------------------------------------------------
    def _encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, L, D) unit projected patch tokens of the tapped blocks and the (B, D) unit CLIP image embedding.

        The taps are the raw residual stream after each block (no ln_post, no CLIP projection), CLS dropped;
        the image embedding is CLIP's own head (ln_post of the last block's CLS, times proj).
        """
        visual = self.clip.visual
        layers = self.config.feature_layers
        x = visual._embeds(images)
        taps = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if index in layers:
                taps.append(x[:, 1:])
        pooled, _ = visual._pool(x)
        patches = torch.stack([projection(tokens) for projection, tokens in zip(self.projections, taps)], dim=1)
        with float32(images):
            return F.normalize(patches.float(), dim=-1), F.normalize((pooled @ visual.proj).float(), dim=-1)

    def _layer_maps(self, patches: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
        """(B, M, 2, H, W) per-layer state probabilities: logits upsampled first, softmax second."""
        logits = similarity_logits(patches, text, self.config.logit_scale)  # (B, M, 2, L)
        return training_maps(logits, tuple(self.clip.visual.grid_size), size)

    def _image_score(self, embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B,) softmax(scale * f [t_n, t_a])[anomalous] of the unit CLIP image embedding f."""
        with float32(embedding):
            logits = self.config.logit_scale * torch.einsum("bd,bkd->bk", embedding, text)
            return logits.softmax(dim=-1)[:, 1]

    # -- the benchmark's calls ------------------------------------------------------------------
    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (B, H, W) maps (sum over layers of the anomalous probability, range 0..M) and (B,) image scores;
        the release applies no smoothing in either domain."""
        text = self.text_features(texts)
        patches, embedding = self._encode_image(images)
        maps = self._layer_maps(patches, text, images.shape[-1])[:, :, 1].sum(dim=1)
        return maps, self._image_score(embedding, text)

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(B, M, 2, H, W) per-layer state probabilities, all the loss needs (the image path is not trained)."""
        patches, _ = self._encode_image(images)
        return self._layer_maps(patches, self.text_features(texts), images.shape[-1])

    def training_losses(self, outputs: torch.Tensor, targets: Targets) -> dict[str, torch.Tensor]:
        """Sum over layers of the release's focal loss (on both channels) and Dice (anomalous channel, smoothing 1).

        The release has no image without a mask; here such images (`targets.known` false) are left out of
        both terms (each term is a mean over the known samples; 0 if none), since an unknown mask read as empty
        would teach that their defects are normal. With all masks known this equals the release's
        pixel mean (focal) and image mean (Dice) over the batch.
        """
        probs, masks = outputs.float(), targets.masks.float()
        weight = targets.known.to(probs.dtype)
        weight = weight / weight.sum().clamp_min(1)
        focal = partial(_focal, gamma=self.config.focal_gamma)
        focal_term = (_per_sample_and_layer(focal, probs, masks) * weight[:, None]).sum()
        dice_term = (_per_sample_and_layer(_dice, probs, masks) * weight[:, None]).sum()
        return {"loss": focal_term + dice_term, "focal_loss": focal_term, "dice_loss": dice_term}


def _focal(probs: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The release's focal loss of one (2, H, W) map against its (H, W) mask."""
    return clamped_focal_loss(probs[None], mask[None], gamma)


def _dice(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The release's Dice loss (smoothing 1) of one map's anomalous channel against its mask."""
    return dice_loss(probs[None, 1], mask[None], "release")


def _per_sample_and_layer(term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], probs: torch.Tensor,
                          masks: torch.Tensor) -> torch.Tensor:
    """(B, M) values of `term` for each sample's M maps (B, M, 2, H, W) against its (B, H, W) mask, so that
    samples can be weighted; the release's batch means are the plain means over B of these."""
    return vmap(vmap(term, in_dims=(0, None)))(probs, masks)
