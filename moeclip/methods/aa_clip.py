"""AA-CLIP (Ma et al., CVPR 2025, "Enhancing Zero-shot Anomaly Detection via Anomaly-Aware CLIP"), as the official
code github.com/Mwxinnn/AA-CLIP at commit 53db195f230442aa118c246876c94ba1c76139cc (train.py, test.py,
forward_utils.py, model/adapter.py, model/transformer.py, scripts.sh) computes it.

A frozen CLIP ViT with two sets of trainable modules, trained one after the other (two `TrainingStage`s):
  1. text: a residual adapter (bias-free linear + LeakyReLU) after each of the first `text_adapter_layers` text
     blocks, mixed as x <- w a' + (1 - w) x with a' = a |x| / |a| (w = `text_adapt_weight`), and a bias-free
     linear + LeakyReLU on the EOT token after ln_final in place of CLIP's text projection. Trained against
     frozen "surgery" patch features: from block `surgery_from` on, each block's attention is CLIP Surgery's
     V-V attention (in the residual stream itself); the tapped blocks' patch tokens go through ln_post and
     CLIP's projection, are normalised and get the unit CLIP image embedding (plain CLIP) added. Loss: the
     segmentation loss (focal + two Dice terms, the release's smoothed forms) of the 100-scaled similarity maps
     plus `text_norm_weight` x (batch mean of <t_n, t_a>)^2 (the anomaly-aware / disentangle term).
  2. image: a residual adapter (same form, `image_adapt_weight`) after each of the first `image_adapter_layers`
     vision blocks (all tokens, CLS included), one bias-free linear per tapped block (ln_post first, optional
     LeakyReLU, normalised) for the maps, one more on the last tapped block for the image embedding (the mean
     of its normalised patch outputs). Text anchors are fixed (computed once with the trained text adapters).
     Loss: 2-way cross-entropy of the unscaled dot products <f, [t_n, t_a]> plus the segmentation loss summed
     over the tapped blocks.
Prompts: every template ("{}.", "a photo of {}.") x state ("{}", "a {}", "the {}" / "a damaged {}", ...) of
text.py (the same lists: the MoECLIP release grew from this code), normalise each embedding, average, normalise.
Test time: per tapped block (s_A + 1 - s_N) / 2 of the 100-scaled logits, Gaussian blur on the grid (kornia,
reflect borders: kernel 7, sigma 1 industrial; kernel 9, sigma 1.5 medical), bilinear upsampling
(align_corners), summed; image score (<f, t_a> + 1) / 2. Per class (forward_utils.metrics_eval): maps and
scores are each min-max normalised over the class unless their maximum is exactly 1, final score
0.5 max(map) + 0.5 score (industrial) or max(map) (medical).

Decisions and paper-vs-code differences (the code is the default, the other an option where cheap):
  - Text stage loss layers (`text_loss_layers`): the official loop re-assigns `loss` for every tapped block, so
    only the last block's segmentation loss (and one orthogonality term) is trained: "last" (default); "all"
    sums over the tapped blocks, as the loop reads as intended.
  - Surgery attention (`surgery_attention`): the official replacement attention reads the transformer's
    sequence-first tensors as batch-first, so for each token position it attends across the images of the
    batch (with one image it is the value path alone): "batch" (default, what the official text stage trained
    on); "tokens" is CLIP Surgery's V-V attention over each image's tokens. Stage 1 maps depend on the batch
    composition under "batch", as in the official code.
  - Backbone: the official model config has no QuickGELU, so the OpenAI weights run through exact GELU
    (`quick_gelu: false` in params.yaml, as for April-GAN); position table resized bicubically with antialias
    (open_clip's and the official `resize_pos_embed`).
  - Stages: text stage `text_epochs` epochs at batch `text_batch_size`, lr `text_lr`, no scheduler (model
    config); image stage = the profile's `train` section (20 epochs, batch 2, lr 5e-4, MultiStepLR
    [16000, 32000] x 0.5 over its own steps), Adam betas (0.5, 0.999) for both, each stage its own optimiser.
    The official text stage reads images without colour jitter; here both stages read the same augmented data.
  - Evaluation: the official test.py evaluates every epoch's saved image adapters; here the final ones (its
    scripts' settings, also for training on MVTec-AD, whence no per-auxiliary settings).
  - Class text: the registry's descriptions (the official REAL_NAMES, except BTAD, where it prompts with long
    colour descriptions; DATASETS.md).
  - Images without a mask (`targets.known` false) are left out of the segmentation terms (the official data
    has none); the classification term uses every image. A class whose maps are all equal gets zeros from the
    per-class min-max (the official code divides 0 by 0).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moeclip.config import BackboneConfig, BlurConfig, Domain, TrainConfig
from moeclip.losses import classification_loss, segmentation_loss
from moeclip.methods.anomalyclip import dual_attention
from moeclip.methods.base import ClassText, TrainingStage, ZeroShotMethod, class_texts
from moeclip.methods.heads import SegmentationProjections
from moeclip.methods.moeclip.text import prompt_ensemble
from moeclip.methods.precision import float32
from moeclip.methods.scoring import (
    anomaly_map,
    image_embedding,
    image_score,
    image_similarities,
    min_max,
    similarity_logits,
    training_maps,
)
from moeclip.methods.targets import Targets

TEXT_STAGE, IMAGE_STAGE = 0, 1


class AAClipConfig(BackboneConfig):
    """The `model` section of an AA-CLIP profile (every value from params.yaml)."""

    class_text: ClassText = Field(description="description: the registry's class descriptions (official REAL_NAMES)")
    feature_layers: tuple[int, ...] = Field(description="1-indexed tapped blocks, strictly increasing (official "
                                                        "levels 6, 12, 18, 24); the last also feeds the image score")
    image_adapter_layers: int = Field(ge=0, description="residual adapters after vision blocks 1..n (official 6)")
    text_adapter_layers: int = Field(ge=0, description="residual adapters after text blocks 1..n (official 3)")
    image_adapt_weight: float = Field(ge=0, le=1, description="w of x <- w a' + (1 - w) x in the vision tower")
    text_adapt_weight: float = Field(ge=0, le=1, description="w of x <- w a' + (1 - w) x in the text tower")
    projection_activation: bool = Field(description="LeakyReLU after the patch projections (official --relu, off "
                                                    "in its scripts)")
    logit_scale: float = Field(description="scale of the patch-text cosines (official 100)")
    surgery_from: int = Field(ge=1, description="first 1-indexed block with V-V attention in the text stage's "
                                                "feature extractor (official surgery_until_layer 20 of 24: 6)")
    surgery_attention: Literal["batch", "tokens"] = Field(
        description="batch: the official code's effective attention across the batch's images per token; "
                    "tokens: V-V attention over each image's tokens")
    text_loss_layers: Literal["last", "all"] = Field(
        description="last: the official text stage trains on the last tapped block only; all: summed over blocks")
    text_norm_weight: float = Field(ge=0, description="weight of the squared mean <t_n, t_a> (official 0.1)")
    focal_gamma: float = Field(description="gamma of the focal loss (official 2)")
    blur_industrial: BlurConfig = Field(description="test-map blur, industrial (official kernel 7, sigma 1)")
    blur_medical: BlurConfig = Field(description="test-map blur, medical (official kernel 9, sigma 1.5)")
    text_epochs: int = Field(ge=0, description="epochs of the text stage (official 5); the train section's "
                                               "epochs are the image stage's")
    text_batch_size: int = Field(ge=1, description="batch size of the text stage (official 16)")
    text_lr: float = Field(gt=0, description="Adam learning rate of the text stage (official 1e-5)")

    @model_validator(mode="after")
    def _layers(self) -> AAClipConfig:
        layers = self.feature_layers
        if not layers or layers[0] < 1 or any(b <= a for a, b in pairwise(layers)):
            raise ValueError(f"feature_layers must be strictly increasing 1-indexed blocks, got {layers}")
        return self


@dataclass(frozen=True)
class AAClipOutputs:
    """One training forward: (B, M, 2, H, W) softmax maps, (B, 2, D) anchors and, in the image stage only, the (B, D)
    image embeddings (None in the text stage)."""

    maps: torch.Tensor
    text: torch.Tensor
    embedding: torch.Tensor | None


def adapter(width: int, out: int | None = None) -> nn.Sequential:
    """The official SimpleAdapter / SimpleProj(relu): bias-free linear + LeakyReLU, xavier-uniform weights."""
    module = nn.Sequential(nn.Linear(width, out or width, bias=False), nn.LeakyReLU())
    nn.init.xavier_uniform_(module[0].weight)
    return module


def residual_adapt(x: torch.Tensor, module: nn.Module, weight: float) -> torch.Tensor:
    """x <- w a' + (1 - w) x, a = module(x) rescaled per token to the norm of x (the official mixing)."""
    out = module(x)
    out = out * x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True)
    return weight * out + (1 - weight) * x


def orthogonality_loss(text: torch.Tensor) -> torch.Tensor:
    """(batch mean of <t_n, t_a>)^2 over the per-sample (B, 2, D) anchors (the official text-stage term)."""
    return (text[:, 0] * text[:, 1]).sum(dim=-1).mean().pow(2)


def unit_unless_max_one(values: torch.Tensor) -> torch.Tensor:
    """The official per-class rule: min-max over all elements unless the maximum is exactly 1."""
    return values if bool(values.max() == 1) else min_max(values)


class AAClip(ZeroShotMethod):
    """AA-CLIP: frozen CLIP + residual text and image adapters trained in two stages (module docstring)."""

    name = "aa_clip"
    config_class = AAClipConfig

    def __init__(self, config: AAClipConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        self.check_layers((*config.feature_layers, config.image_adapter_layers, config.surgery_from))
        text_depth = len(clip.transformer.resblocks)
        if config.text_adapter_layers > text_depth:
            raise ValueError(f"{config.backbone}'s text tower has {text_depth} blocks; "
                             f"text_adapter_layers {config.text_adapter_layers} does not fit")
        visual = clip.visual
        width, embed_dim, text_width = visual.conv1.out_channels, visual.output_dim, clip.ln_final.normalized_shape[0]
        self.image_adapters = nn.ModuleList(adapter(width) for _ in range(config.image_adapter_layers))
        self.projections = SegmentationProjections(config.feature_layers, width, embed_dim,
                                                   config.projection_activation)
        self.det_projection = SegmentationProjections(config.feature_layers[-1:], width, embed_dim,
                                                      config.projection_activation)
        self.text_adapters = nn.ModuleList(adapter(text_width) for _ in range(config.text_adapter_layers))
        self.text_head = adapter(text_width, embed_dim)
        self.tokenizer = tokenizer
        self.stage = TEXT_STAGE
        self._text_cache: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    # -- stages ---------------------------------------------------------------------------------
    @classmethod
    def training_stages(cls, config: AAClipConfig, train: TrainConfig) -> list[TrainingStage]:
        """Text adapters first (the model config's text_* settings, no schedule), image modules second (`train`)."""
        text = train.model_copy(update={"epochs": config.text_epochs, "batch_size": config.text_batch_size,
                                        "lr": config.text_lr, "milestones": ()})
        stages = [TrainingStage(text, ("text_adapters", "text_head")),
                  TrainingStage(train, ("image_adapters", "projections", "det_projection"))]
        return stages if config.text_epochs else stages[1:]

    def begin_stage(self, index: int) -> None:
        self.stage = index if self.config.text_epochs else IMAGE_STAGE

    # -- text -----------------------------------------------------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        return class_texts(batch, self.config.class_text)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(P, D) text embeddings with the residual adapters after the first blocks and the EOT head."""
        clip = self.clip
        x = clip.token_embedding(tokens) + clip.positional_embedding.to(clip.token_embedding.weight.dtype)
        for index, block in enumerate(clip.transformer.resblocks):
            x = block(x, attn_mask=clip.attn_mask)
            if index < len(self.text_adapters):
                x = residual_adapt(x, self.text_adapters[index], self.config.text_adapt_weight)
        x = clip.ln_final(x)
        return self.text_head(x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])

    def _anchors(self, text: str) -> torch.Tensor:
        """(2, D) [t_n, t_a]: per state, the mean of the unit prompt embeddings, normalised again."""
        device = self.clip.ln_final.weight.device
        normal, abnormal = prompt_ensemble(text)
        with float32(device):
            embeddings = F.normalize(self.encode_text(self.tokenizer(normal + abnormal).to(device)).float(), dim=-1)
            return F.normalize(torch.stack([embeddings[:len(normal)].mean(0), embeddings[len(normal):].mean(0)]),
                               dim=-1)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) per-sample anchors; with frozen text adapters each class text is encoded once (the cache is
        keyed by the adapters' versions, so a training step or a loaded state invalidates it)."""
        params = [*self.text_adapters.parameters(), *self.text_head.parameters()]
        if any(p.requires_grad for p in params) and torch.is_grad_enabled():
            unique = {text: self._anchors(text) for text in dict.fromkeys(texts)}
            return torch.stack([unique[text] for text in texts])
        version = tuple(p._version for p in params)
        for text in dict.fromkeys(texts):
            cached = self._text_cache.get(text)
            if cached is None or cached[0] != version:
                with torch.no_grad():
                    self._text_cache[text] = (version, self._anchors(text))
        return torch.stack([self._text_cache[text][1] for text in texts])

    # -- vision ---------------------------------------------------------------------------------
    def _project_patches(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(M, B, L, width) raw patch tokens -> ln_post -> CLIP's projection -> unit (M, B, L, D) (text stage)."""
        visual = self.clip.visual
        return F.normalize(visual.ln_post(torch.stack(taps)) @ visual.proj, dim=-1)

    def surgery_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, M, L, D) frozen features of the text stage: V-V attention from `surgery_from` on, tapped patch tokens
        projected by CLIP and normalised, plus the unit CLIP image embedding of the plain model."""
        config, visual = self.config, self.clip.visual
        with torch.no_grad():
            cls = F.normalize(self.clip.encode_image(images), dim=-1)
            x, taps = visual._embeds(images), []
            for index, block in enumerate(visual.transformer.resblocks, start=1):
                if index < config.surgery_from:
                    x = block(x)
                else:
                    x = x + block.ls_1(self._surgery_attention(block.attn, block.ln_1(x)))
                    x = x + block.ls_2(block.mlp(block.ln_2(x)))
                if index in config.feature_layers:
                    taps.append(x[:, 1:])
            return (self._project_patches(taps) + cls[None, :, None]).transpose(0, 1)

    def _surgery_attention(self, attn: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
        """V-V attention of the (B, L, W) LN1 output over each image's tokens, or (`batch`) over the batch's images
        at each token position, as the official replacement attention computes on sequence-first tensors."""
        if self.config.surgery_attention == "tokens":
            return dual_attention(attn, h)[1]
        return dual_attention(attn, h.transpose(0, 1))[1].transpose(0, 1)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, L, D) unit adapted patch features of the tapped blocks and the (B, D) image embedding."""
        config, visual = self.config, self.clip.visual
        x, taps = visual._embeds(images), []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if index <= len(self.image_adapters):
                x = residual_adapt(x, self.image_adapters[index - 1], config.image_adapt_weight)
            if index in config.feature_layers:
                taps.append(x[:, 1:])
        normed = visual.ln_post(torch.stack(taps))  # (M, B, L, width)
        patches = self.projections(normed)
        embedding = image_embedding(self.det_projection(normed[-1:])[0], "release")
        return patches.transpose(0, 1), embedding

    # -- the benchmark's calls ------------------------------------------------------------------
    def _blur(self, domain: Domain) -> BlurConfig:
        return self.config.blur_industrial if domain == "industrial" else self.config.blur_medical

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (B, H, W) maps (sum over tapped blocks of the blurred (s_A + 1 - s_N) / 2), (B,) (<f, t_a> + 1) / 2."""
        text = self.text_features(texts)
        patches, embedding = self.encode_image(images)
        logits = similarity_logits(patches, text, self.config.logit_scale)
        maps = anomaly_map(logits, tuple(self.clip.visual.grid_size), images.shape[-1], self._blur(domain))
        return maps, image_score(image_similarities(embedding, text, "release"))

    def protocol_scores(self, maps: torch.Tensor, scores: torch.Tensor,
                        domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class: maps and scores min-max normalised unless their maximum is 1; final score
        0.5 max(map) + 0.5 score (industrial) or max(map) (medical)."""
        maps, scores = unit_unless_max_one(maps.float()), unit_unless_max_one(scores.float())
        peak = maps.flatten(1).amax(dim=1)
        return maps, (0.5 * peak + 0.5 * scores if domain == "industrial" else peak)

    def _maps(self, patches: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
        """(B, M, 2, H, W) softmax maps of the 100-scaled similarities."""
        logits = similarity_logits(patches, text, self.config.logit_scale)
        return training_maps(logits, tuple(self.clip.visual.grid_size), size)

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> AAClipOutputs:
        """The current stage's forward: the text stage's maps on the frozen surgery features (the last tapped block
        only unless `text_loss_layers` is all), or the image stage's maps and image embeddings."""
        text = self.text_features(texts)
        if self.stage == TEXT_STAGE:
            patches = self.surgery_features(images)
            if self.config.text_loss_layers == "last":
                patches = patches[:, -1:]
            return AAClipOutputs(self._maps(patches, text, images.shape[-1]), text, None)
        patches, embedding = self.encode_image(images)
        return AAClipOutputs(self._maps(patches, text, images.shape[-1]), text, embedding)

    def training_losses(self, outputs: AAClipOutputs, targets: Targets) -> dict[str, torch.Tensor]:
        """Text stage: seg + text_norm_weight * orthogonality; image stage: cross-entropy + seg (summed over maps)."""
        seg = segmentation_loss(outputs.maps.float(), targets.masks, self.config.focal_gamma, targets.known,
                                dice="release", focal="release")
        if outputs.embedding is None:
            orthogonal = orthogonality_loss(outputs.text.float())
            return {"loss": seg + self.config.text_norm_weight * orthogonal, "seg_loss": seg,
                    "orthogonal_loss": orthogonal}
        similarities = image_similarities(outputs.embedding, outputs.text, "release")
        classification = classification_loss(similarities, targets.labels, "cross_entropy")
        return {"loss": classification + seg, "seg_loss": seg, "classification_loss": classification}
