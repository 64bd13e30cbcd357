"""The MoECLIP network: frozen open_clip ViT + MoE adapters + PAA + heads + text anchors."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeclip.config import Domain, ModelConfig
from moeclip.losses import (
    balance_loss,
    classification_loss,
    etf_loss,
    expert_contrastive_loss,
    expert_cosine_loss,
    segmentation_loss,
)
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.targets import Targets
from moeclip.methods.heads import SegmentationProjections
from moeclip.methods.moeclip.image_adapter import DepthwiseImageAdapter
from moeclip.methods.moeclip.moe import MoEAdapter, MoEAux
from moeclip.methods.moeclip.paa import patch_average
from moeclip.methods.precision import float32
from moeclip.methods.scoring import (
    anomaly_map,
    image_embedding,
    image_score,
    image_similarities,
    per_class_protocol_scores,
    similarity_logits,
    training_maps,
)
from moeclip.methods.moeclip.text import TextAnchors, prompt_descriptions

CONSTRAINTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "etf": etf_loss, "cosine": expert_cosine_loss, "contrastive": expert_contrastive_loss,
}


@dataclass
class VisionOutput:
    """Projected patch features of every (layer, scale) map and the image embedding."""

    patch_features: torch.Tensor  # (B, M, L, D) unit vectors, M = layers x scales, layer-major
    image_embedding: torch.Tensor  # (B, D) V_image
    moe: dict[int, MoEAux]  # per MoE layer (1-indexed block)
    grid: tuple[int, int]


class MoECLIP(ZeroShotMethod):
    """MoECLIP as in SPEC.md sections 1-7; `config` selects every ablation variant."""

    name = "moeclip"
    config_class = ModelConfig

    def __init__(self, config: ModelConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        visual = clip.visual
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.output_dim
        self.depth = len(visual.transformer.resblocks)
        self.grid = tuple(visual.grid_size)
        self.check_layers(set(config.moe_layers) | set(config.feature_layers))
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

    # -- the method's protocol (moeclip/methods/base.py) -------------------------------------------
    @contextlib.contextmanager
    def expert_dispatch(self, sparse: bool) -> Iterator[None]:
        """`predict` mixes only each token's top-k experts (`sparse`) or evaluates all K (`dense_inference`)."""
        previous, self.dense_inference = self.dense_inference, not sparse
        try:
            yield
        finally:
            self.dense_inference = previous

    def trains_in_train_mode(self) -> bool:
        """The release trains in eval mode (sparse top-k, no dropout): `release_compat` does as it does."""
        return not self.config.release_compat

    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        """Class descriptions or names, as `use_class_descriptions` and `description_set` say."""
        return prompt_descriptions(batch, self.config)

    def protocol_scores(self, maps: torch.Tensor, scores: torch.Tensor,
                        domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """The release's per-class normalisation and the domain's fusion of map maximum and S_A (SPEC 6)."""
        return per_class_protocol_scores(maps, scores, domain)

    def training_losses(self, outputs: tuple[torch.Tensor, torch.Tensor, VisionOutput],
                        targets: Targets) -> dict[str, torch.Tensor]:
        """L = L_seg + L_ac + lambda_etf * L_constraint + lambda_bal * L_bal (Eq. 16), in float32."""
        maps, similarities, vision = outputs
        config = self.config
        zero = maps.new_zeros((), dtype=torch.float32)
        seg = segmentation_loss(maps, targets.masks, config.focal_gamma, targets.known, config.dice,
                                config.focal)
        ac = classification_loss(similarities, targets.labels, config.classification_loss)
        expert_outputs = [aux.expert_outputs for aux in vision.moe.values() if aux.expert_outputs is not None]
        constraint = sum((CONSTRAINTS[config.expert_constraint](o) for o in expert_outputs), zero)
        balance = zero if config.release_compat else sum(
            (balance_loss(aux.routing.probs, config.balance_unbiased) for aux in vision.moe.values()), zero)
        total = seg + ac + config.lambda_etf * constraint + config.lambda_bal * balance
        return {"loss": total, "segmentation_loss": seg, "classification_loss": ac,
                "expert_constraint_loss": constraint, "balance_loss": balance}

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
    """Build MoECLIP from a config (or the params.yaml `model` mapping); see `ZeroShotMethod.build`."""
    return MoECLIP.build(config if isinstance(config, ModelConfig) else ModelConfig.model_validate(config), seed)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """`MoECLIP.parameter_counts` of a configuration without building its weights (the smoke run counts 79
    variants)."""
    return MoECLIP.count_parameters(config)
