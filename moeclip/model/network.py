"""The MoECLIP network: frozen open_clip ViT + MoE adapters + PAA + heads + text anchors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from moeclip.backbone import load_clip, tokenizer_for
from moeclip.config import Domain, ModelConfig
from moeclip.data.dataset import ManifestDataset
from moeclip.model.heads import DepthwiseImageAdapter, SegmentationProjections
from moeclip.model.moe import MoEAdapter, MoEAux
from moeclip.model.paa import patch_average
from moeclip.model.precision import float32
from moeclip.model.scoring import (
    anomaly_map,
    image_embedding,
    image_score,
    image_similarities,
    similarity_logits,
    training_maps,
)
from moeclip.model.text import TextAnchors


@dataclass
class VisionOutput:
    """Projected patch features of every (layer, scale) map and the image embedding."""

    patch_features: torch.Tensor  # (B, M, L, D) unit vectors, M = layers x scales, layer-major
    image_embedding: torch.Tensor  # (B, D) V_image
    moe: dict[int, MoEAux]  # per MoE layer (1-indexed block)
    grid: tuple[int, int]


class MoECLIP(nn.Module):
    """MoECLIP as in SPEC.md sections 1-6; `config` selects every ablation variant."""

    def __init__(self, config: ModelConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.clip = clip.requires_grad_(False).eval()
        visual = clip.visual
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError("open_clip transformer must be batch-first")
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.output_dim
        self.depth = len(visual.transformer.resblocks)
        self.grid = tuple(visual.grid_size)
        layers = set(config.moe_layers) | set(config.feature_layers)
        if max(layers, default=0) > self.depth:
            raise ValueError(f"{config.backbone} has {self.depth} blocks; layers {sorted(layers)} do not fit")
        self.moe = nn.ModuleDict({str(layer): MoEAdapter(self.width, config.moe)
                                  for layer in sorted(config.moe_layers)})
        if not config.vanilla:
            self.projections = SegmentationProjections(config.feature_layers, self.width, self.embed_dim,
                                                       config.projection_activation)
            self.image_adapter = DepthwiseImageAdapter(self.width, self.embed_dim) if config.image_adapter else None
        self.text = TextAnchors(clip, tokenizer, config.text_head, config.learnable_prompts,
                                config.prompt_context_length)
        # Evaluate all K experts in `predict` (the reference computation) instead of only the top-k.
        self.dense_inference = False

    # -- modes and parameters -------------------------------------------------------------
    def train(self, mode: bool = True) -> "MoECLIP":
        super().train(mode)
        self.clip.eval()  # the frozen backbone never uses dropout or patch dropout
        return self

    def added_modules(self) -> dict[str, nn.Module]:
        """The modules MoECLIP adds to CLIP (what a checkpoint must hold)."""
        return {name: module for name, module in self.named_children() if name != "clip"}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the added modules only (the frozen backbone comes from its own weights)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def inputs(self, frame: pd.DataFrame, **options: Any) -> ManifestDataset:
        """A manifest's images (and masks) as this network takes them: resized to the size it was built for
        and CLIP-normalised (SPEC 1); `options` (train, seed, ...) as `ManifestDataset` takes them."""
        return ManifestDataset(frame, self.config.image_size, **options)

    def parameter_counts(self) -> dict[str, int]:
        backbone = sum(p.numel() for p in self.clip.parameters())
        added = sum(p.numel() for m in self.added_modules().values() for p in m.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": backbone + added, "trainable": trainable, "backbone": backbone, "added": added}

    # -- vision -------------------------------------------------------------------------------
    def _blocks(self, images: torch.Tensor, dense: bool | None) -> tuple[dict[int, torch.Tensor], dict[int, MoEAux]]:
        """Run the ViT with MoE layers; return tokens of the feature layers (and the last block if vanilla)."""
        visual = self.clip.visual
        wanted = set(self.config.feature_layers) | ({self.depth} if self.config.vanilla else set())
        last = max(wanted)
        first_adapted = min((int(k) for k in self.moe), default=last + 1)
        features: dict[int, torch.Tensor] = {}
        aux: dict[int, MoEAux] = {}
        # The patch embedding runs outside bf16 autocast: the residual stream then stays float32
        # (open_clip's LayerNorm returns its input's dtype), and only the outputs of the blocks'
        # matmuls added to it are bf16-rounded. It is 0.1 % of the FLOPs.
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad), \
                float32(images):
            x = visual._embeds(images)
        for index, block in enumerate(visual.transformer.resblocks[:last], start=1):
            # Blocks before the first MoE layer are frozen and need no autograd graph.
            with torch.set_grad_enabled(torch.is_grad_enabled() and (index >= first_adapted or x.requires_grad)):
                x = block(x)
            if str(index) in self.moe:
                x, aux[index] = self.moe[str(index)](x, dense=dense)
            if index in wanted:
                features[index] = x
        return features, aux

    def _project(self, normed: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """(len(layers), ..., d) ln_post outputs -> (len(layers), ..., D) unit vectors.

        Each layer's Proj_l, or CLIP's own projection for vanilla CLIP.
        """
        if self.config.vanilla:
            return F.normalize(normed @ self.clip.visual.proj, dim=-1)
        return self.projections(normed, layers)

    def _image_embedding(self, features: dict[int, torch.Tensor], normed: torch.Tensor,
                         projected: torch.Tensor) -> torch.Tensor:
        """V_image from the last layer's scale-1 map, reusing its ln_post and projection when PAA computed them.

        With the depth-wise adapter, from its per-patch outputs (`image_score` says how); without it
        (a Table 2 ablation), from the projected patches; vanilla CLIP uses its CLS embedding.
        """
        visual = self.clip.visual
        if self.config.vanilla:
            return F.normalize(visual.ln_post(features[self.depth][:, 0]) @ visual.proj, dim=-1)
        last, scales = self.config.feature_layers[-1], self.config.paa_scales
        normed_s1 = normed[-1, scales.index(1)] if 1 in scales else visual.ln_post(features[last][:, 1:])
        if self.image_adapter is not None:
            return image_embedding(self.image_adapter(normed_s1), self.config.image_score)
        projected_s1 = projected[-1, scales.index(1)] if 1 in scales else self._project(normed_s1[None], [last])[0]
        return image_embedding(projected_s1, self.config.image_score)

    def encode_image(self, images: torch.Tensor, dense: bool | None = None) -> VisionOutput:
        """Patch features for every (layer, scale) and V_image. `dense` defaults to training mode.

        PAA, ln_post and the projections each run once over all layers and scales stacked.
        """
        features, aux = self._blocks(images, dense)
        layers = self.config.feature_layers
        tokens = torch.stack([features[layer][:, 1:] for layer in layers])  # (layers, B, L, d)
        pooled = torch.stack([patch_average(tokens.flatten(0, 1), self.grid, s).unflatten(0, tokens.shape[:2])
                              for s in self.config.paa_scales], dim=1)  # (layers, scales, B, L, d)
        normed = self.clip.visual.ln_post(pooled)
        projected = self._project(normed, layers)
        return VisionOutput(
            patch_features=projected.permute(2, 0, 1, 3, 4).flatten(1, 2),  # a view, maps-major in memory
            image_embedding=self._image_embedding(features, normed, projected),
            moe=aux,
            grid=self.grid,
        )

    # -- text and outputs ------------------------------------------------------------------
    def text_anchors(self, descriptions: Sequence[str]) -> torch.Tensor:
        """(C, 2, D) [T_N, T_A] for each class description."""
        return self.text(list(descriptions))

    def anchors_per_sample(self, descriptions: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) anchors for a batch whose samples may belong to different classes."""
        unique = list(dict.fromkeys(descriptions))
        anchors = self.text_anchors(unique)
        return anchors[torch.tensor([unique.index(d) for d in descriptions], device=anchors.device)]

    def logits(self, vision: VisionOutput, anchors: torch.Tensor) -> torch.Tensor:
        return similarity_logits(vision.patch_features, anchors, self.config.logit_scale)

    def training_outputs(self, images: torch.Tensor,
                         descriptions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, VisionOutput]:
        """Eq. 12 maps (B, M, 2, H, W), image similarities (B, 2) [s_N, s_A] (see `image_similarities`), and
        the vision output."""
        vision = self.encode_image(images)
        anchors = self.anchors_per_sample(descriptions)
        maps = training_maps(self.logits(vision, anchors), vision.grid, images.shape[-1])
        return maps, image_similarities(vision.image_embedding, anchors, self.config.image_score), vision

    def predict(self, images: torch.Tensor, descriptions: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-time anomaly maps (B, H, W) and image scores S_A (B,), before per-class normalisation."""
        return self.predict_with_anchors(images, self.anchors_per_sample(descriptions), domain)

    def predict_with_anchors(self, images: torch.Tensor, anchors: torch.Tensor,
                             domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict` with the (B, 2, D) text anchors given: the image path alone, as an exported model runs it."""
        vision = self.encode_image(images, dense=self.dense_inference)
        maps = anomaly_map(self.logits(vision, anchors), vision.grid, images.shape[-1], self.config.blur_for(domain))
        return maps, image_score(image_similarities(vision.image_embedding, anchors, self.config.image_score))


def build_model(config: ModelConfig | dict, seed: int | None = None) -> MoECLIP:
    """Build MoECLIP from a config (or the params.yaml `model` mapping).

    `seed` fixes every random initialisation (a random-weight backbone, FOFS, the heads)
    without touching the caller's RNG state.
    """
    config = config if isinstance(config, ModelConfig) else ModelConfig.model_validate(config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        clip = load_clip(config.backbone, config.image_size, config.weights, config.quick_gelu)
        return MoECLIP(config, clip, tokenizer_for(config.backbone))


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """`MoECLIP.parameter_counts` of a configuration without building its weights.

    The model is laid out on the meta device: no tensor is allocated or initialised, so a
    ViT-L counts in a fraction of a second instead of seconds (the smoke run counts 79 variants).
    """
    with torch.device("meta"):
        clip = load_clip(config.backbone, config.image_size, None, config.quick_gelu, device="meta")
        return MoECLIP(config, clip, tokenizer_for(config.backbone)).parameter_counts()
