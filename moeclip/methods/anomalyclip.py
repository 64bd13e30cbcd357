"""AnomalyCLIP (Zhou et al., ICLR 2024): class-agnostic learned prompts on a frozen CLIP with a V-V attention side path.

Implements ../shared/BASELINES.md section 3 (facts from the official code, zqhang/AnomalyCLIP at 45ed4dd):
- vision (3b): blocks before `dpam_from` are standard; from there on two streams leave the same block input.
  x_ori runs the block as CLIP does (Q-K attention + MLP) and gives the global token g = x_ori[CLS] @ proj
  (no ln_post). x_vv only accumulates the block's V-V attention of LN1(x_ori entering the block), no MLP;
  the patch features of a feature layer are ln_post(x_vv) @ proj;
- text (3b.5): two class-agnostic prompts "X x n <object>." and "X x n <anomaly> <object>.", whose n placeholder
  embeddings are the learned ctx_pos / ctx_neg; before text blocks 2..deep_prompt_depth positions 1..m of both
  sequences are overwritten by that block's deep tokens ("prefix overwriting");
- scores: p(v) = softmax([<v,t_n>, <v,t_a>] / temperature) on unit vectors; image score p(g)[1]; map = sum over the
  feature layers of the anomalous probability of the patch tokens, softmax first, then bilinear upsampling to the
  input size, then a Gaussian (scipy's gaussian_filter: truncate 4, mode reflect) on the full-size map;
- training (3e): CE on the global logits + lambda_local * sum over the feature layers of [focal + Dice(S_a, G) +
  Dice(S_n, 1 - G)], focal and Dice as April-GAN's (moeclip/losses.py).
The class name never enters the prompts: `prompt_texts` returns the folder names only to satisfy the protocol,
and `predict` / `training_outputs` ignore them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from pydantic import Field, model_validator
from torch import nn

from moeclip.backbone import load_clip
from moeclip.config import BackboneConfig, Domain
from moeclip.losses import clamped_focal_loss, dice_loss, mean_over_known
from moeclip.methods.base import ZeroShotMethod, class_texts
from moeclip.methods.targets import Targets
from moeclip.methods.precision import float32
from moeclip.methods.prompts import CONTEXT_PLACEHOLDER
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default, which the official test.py uses


class AnomalyCLIPConfig(BackboneConfig):
    """Everything that defines an AnomalyCLIP network; every value comes from params.yaml."""

    position_resize: Literal["bilinear", "bicubic_antialias"] = Field(
        description="how the visual position table reaches image_size: bilinear from the weights' own grid "
                    "(official), or open_clip's bicubic with antialias (force_image_size)")
    prompt_length: int = Field(ge=1, description="learned context vectors per prompt (E = 12)")
    deep_prompt_length: int = Field(ge=1, description="deep text tokens per layer (4)")
    deep_prompt_depth: int = Field(ge=1, description="text blocks 2..depth get deep tokens (9: 8 sets)")
    deep_prompt_fp16: bool = Field(description="round the deep tokens through float16 as the official code does")
    dpam_from: int = Field(ge=1, description="first (1-indexed) vision block with the V-V side path (6 of 24)")
    feature_layers: tuple[int, ...] = Field(
        description="1-indexed blocks whose maps are summed; (24,) = the published 'layer 24 only' behaviour")
    temperature: float = Field(gt=0)
    lambda_local: float = Field(ge=0, description="weight of the local (focal + 2 Dice) loss (4)")
    focal_gamma: float = Field(description="gamma of the local focal loss (the official code: 2)")
    sigma: float = Field(gt=0, description="Gaussian on the full-size test map, in pixels (4 at 518 px)")
    object_word: str
    anomaly_word: str

    @model_validator(mode="after")
    def _consistent(self) -> AnomalyCLIPConfig:
        if not self.feature_layers or min(self.feature_layers) < 1:
            raise ValueError("feature_layers must name at least one 1-indexed vision block")
        if self.deep_prompt_length > self.prompt_length:
            raise ValueError("deep tokens overwrite context positions: deep_prompt_length <= prompt_length")
        return self


@dataclass
class VisionFeatures:
    """Projected, not normalised: g (B, D) and the patch features of every feature layer (L, B, 1 + N, D)."""

    global_embedding: torch.Tensor
    patch_features: torch.Tensor


@dataclass
class AnomalyCLIPOutputs:
    """What a training step's losses need: the global logits (B, 2) = [<g,t_n>, <g,t_a>] / temperature and the
    upsampled [normal, anomalous] probabilities of every feature layer (B, L, 2, H, W)."""

    image_logits: torch.Tensor
    probabilities: torch.Tensor


class LearnedPrompts(nn.Module):
    """The only trainable tensors: ctx_pos / ctx_neg (n, W) and one (m, W) deep token set per text block
    2..depth, all N(0, 0.02^2) in the official order (ctx_pos, ctx_neg, deep)."""

    def __init__(self, length: int, deep_length: int, deep_sets: int, width: int) -> None:
        super().__init__()
        self.ctx_pos = nn.Parameter(torch.empty(length, width).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(length, width).normal_(std=0.02))
        self.deep = nn.Parameter(torch.empty(deep_sets, deep_length, width).normal_(std=0.02))


def gaussian_kernel(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> torch.Tensor:
    """scipy's 1-D Gaussian: radius int(truncate * sigma + 0.5), weights normalised to sum 1 (float64)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def symmetric_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a line padded by `radius` in scipy's 'reflect' mode (d c b a | a b c d |
    d c b a, the edge repeated), for any radius: the padded line is periodic with period 2 * size."""
    position = torch.arange(-radius, size + radius, device=device).remainder(2 * size)
    return torch.where(position >= size, 2 * size - 1 - position, position)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) maps smoothed as scipy.ndimage.gaussian_filter(map, sigma) smooths each: separable, axis H
    first, 'reflect' borders, truncate 4; in the maps' dtype."""
    kernel = gaussian_kernel(sigma).to(maps)
    radius = (kernel.numel() - 1) // 2
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    for dim in (2, 3):
        x = x.index_select(dim, symmetric_indices(x.shape[dim], radius, x.device))
        shape = [1, 1, 1, 1]
        shape[dim] = kernel.numel()
        x = F.conv2d(x, kernel.view(shape))
    return x.squeeze(1)


def dual_attention(attn: nn.MultiheadAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's Q-K attention output and its V-V output (per head softmax(v v^T / sqrt(d)) v), both through
    out_proj, from the same LN1 input h (B, L, W): one in-projection serves both."""
    heads = attn.num_heads
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)

    def merged(out: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(out.transpose(1, 2).flatten(2))

    return merged(F.scaled_dot_product_attention(q, k, v)), merged(F.scaled_dot_product_attention(v, v, v))


def dual_block(block: ResidualAttentionBlock, x_ori: torch.Tensor,
               x_vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPAM block (BASELINES 3b.2): x_ori runs the block normally; x_vv gains the V-V output computed from
    LN1 of the x_ori entering the block, and skips the MLP."""
    qk, vv = dual_attention(block.attn, block.ln_1(x_ori))
    x_ori = x_ori + block.ls_1(qk)
    x_ori = x_ori + block.ls_2(block.mlp(block.ln_2(x_ori)))
    return x_ori, x_vv + block.ls_1(vv)


def resize_positions(visual: nn.Module, image_size: int, mode: Literal["bilinear", "bicubic"]) -> None:
    """Resize the position table to `image_size` as the official codes do (AnomalyCLIP on its first forward:
    bilinear; AdaCLIP when loading: bicubic): the grid part interpolated with align_corners False and no
    antialias (open_clip's bicubic antialias weighs differently), the CLS entry kept."""
    old = tuple(visual.grid_size)
    new = (image_size // visual.patch_size[0], image_size // visual.patch_size[1])
    if new == old:
        return
    table = visual.positional_embedding.data
    grid = F.interpolate(table[1:].reshape(1, *old, -1).permute(0, 3, 1, 2), size=new, mode=mode, align_corners=False)
    visual.positional_embedding = nn.Parameter(torch.cat([table[:1], grid.permute(0, 2, 3, 1).flatten(0, 2)]),
                                               requires_grad=False)
    visual.image_size, visual.grid_size = (image_size, image_size), new


def native_image_size(backbone: str) -> int:
    """The input size the backbone's configuration (and its pretrained weights) has."""
    return open_clip.get_model_config(backbone)["vision_cfg"]["image_size"]


def probabilities(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """p(v) = softmax([<v,t_n>, <v,t_a>] / temperature) of unit v, in float32: (..., D) -> (..., 2)."""
    return (F.normalize(features.float(), dim=-1) @ text.T / temperature).softmax(dim=-1)


class AnomalyCLIP(ZeroShotMethod):
    """AnomalyCLIP as in BASELINES.md section 3 on a frozen open_clip ViT."""

    name = "anomalyclip"
    config_class = AnomalyCLIPConfig

    def __init__(self, config: AnomalyCLIPConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        self.depth = len(clip.visual.transformer.resblocks)
        self._check_architecture(config, clip.visual, clip.transformer)
        width = clip.ln_final.normalized_shape[0]
        self.prompts = LearnedPrompts(config.prompt_length, config.deep_prompt_length, config.deep_prompt_depth - 1,
                                      width)
        placeholders = " ".join([CONTEXT_PLACEHOLDER] * config.prompt_length)
        texts = [f"{placeholders} {config.object_word}.", f"{placeholders} {config.anomaly_word} {config.object_word}."]
        self.register_buffer("tokens", tokenizer(texts), persistent=False)  # (2, context) [normal, anomalous]
        self._text_cache: tuple[tuple, torch.Tensor] | None = None

    def _check_architecture(self, config: AnomalyCLIPConfig, visual: nn.Module, text: nn.Module) -> None:
        """The dual path needs open_clip's plain batch-first blocks with nn.MultiheadAttention, and the layers
        the config names must exist (dpam_from = depth + 1 switches DPAM off)."""
        if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks) or \
                not (visual.transformer.batch_first and text.batch_first):
            raise ValueError(f"{config.backbone}: AnomalyCLIP needs open_clip's batch-first ResidualAttentionBlocks")
        if config.dpam_from > self.depth + 1 or max(config.feature_layers) > self.depth:
            raise ValueError(f"{config.backbone} has {self.depth} vision blocks: dpam_from {config.dpam_from} or "
                             f"feature_layers {config.feature_layers} do not fit")
        if config.deep_prompt_depth > len(text.resblocks):
            raise ValueError(f"deep_prompt_depth {config.deep_prompt_depth} exceeds the {len(text.resblocks)} "
                             f"text blocks of {config.backbone}")

    @classmethod
    def load_backbone(cls, config: AnomalyCLIPConfig) -> nn.Module:
        """With `position_resize: bilinear` CLIP is loaded at its native size and its position table resized the
        official way (open_clip would resize bicubic with antialias)."""
        if config.position_resize == "bicubic_antialias":
            return super().load_backbone(config)
        clip = load_clip(config.backbone, native_image_size(config.backbone), config.weights, config.quick_gelu)
        resize_positions(clip.visual, config.image_size, "bilinear")
        return clip

    def load_official_prompts(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an official checkpoint's `prompt_learner` state: ctx_pos / ctx_neg (1, 1, n, W) and
        compound_prompts_text.<i> (m, W); its buffers and the unused compound_prompt_projections are skipped."""
        deep = [state[f"compound_prompts_text.{i}"] for i in range(self.prompts.deep.shape[0])]
        with torch.no_grad():
            self.prompts.ctx_pos.copy_(state["ctx_pos"].reshape(self.prompts.ctx_pos.shape))
            self.prompts.ctx_neg.copy_(state["ctx_neg"].reshape(self.prompts.ctx_neg.shape))
            if deep:
                self.prompts.deep.copy_(torch.stack(deep))

    # -- the method's protocol (moeclip/methods/base.py) -------------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        """The folder names, for the protocol only: AnomalyCLIP's prompts are class-agnostic and ignore them."""
        return class_texts(batch, "folder")

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, H, W): the anomalous probabilities summed over the feature layers, then the Gaussian; image
        scores (B,) p(g)[1]. `texts` and `domain` are ignored (class-agnostic prompts, one sigma everywhere)."""
        text = self.text_features()
        vision = self.encode_image(images)
        with float32(images):
            maps = self.local_probabilities(vision.patch_features, text, images.shape[-2:])[:, :, 1].sum(dim=1)
            scores = probabilities(vision.global_embedding, text, self.config.temperature)[:, 1]
            return gaussian_blur(maps, self.config.sigma), scores

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> AnomalyCLIPOutputs:
        """The global logits and upsampled probability maps; the text is recomputed (it carries the gradient)."""
        text = self.text_features()
        vision = self.encode_image(images)
        with float32(images):
            logits = F.normalize(vision.global_embedding.float(), dim=-1) @ text.T / self.config.temperature
            return AnomalyCLIPOutputs(logits, self.local_probabilities(vision.patch_features, text, images.shape[-2:]))

    def training_losses(self, outputs: AnomalyCLIPOutputs, targets: Targets) -> dict[str, torch.Tensor]:
        """CE(global logits, label) + lambda_local * (focal + Dice(S_a, G) + Dice(S_n, 1 - G)) summed over the
        feature layers (BASELINES 3e), in float32.

        The CE uses every sample. The local terms are per-sample means over the samples whose mask is known
        (0 if none): with every mask known that equals the official batch means (the focal's mean over all
        pixels of equally sized maps, the Dice's batch mean); a sample with an unknown mask teaches only the
        image-level term instead of being pushed towards an all-normal map.
        """
        image = F.cross_entropy(outputs.image_logits.float(), targets.labels.long())
        probs = outputs.probabilities.float()
        batch, layers = probs.shape[:2]
        masks = (targets.masks > 0.5).float()[:, None].expand(-1, layers, -1, -1)
        terms = torch.vmap(partial(_local_terms, gamma=self.config.focal_gamma))
        focal, dice = terms(probs.flatten(0, 1), masks.flatten(0, 1))
        focal = mean_over_known(focal.view(batch, layers).sum(dim=1), targets.known)
        dice = mean_over_known(dice.view(batch, layers).sum(dim=1), targets.known)
        local = focal + dice
        return {"loss": image + self.config.lambda_local * local, "image_loss": image, "local_loss": local,
                "focal_loss": focal, "dice_loss": dice}

    # -- vision -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> VisionFeatures:
        """Run every block, the dual path from `dpam_from` on; no autograd graph (nothing trainable in it).

        The patch embedding runs in float32 so that under bf16 autocast the residual streams stay float32.
        """
        visual, layers = self.clip.visual, self.config.feature_layers
        with torch.no_grad():
            with float32(images):
                x = visual._embeds(images)
            x_vv = None
            taps = []
            for index, block in enumerate(visual.transformer.resblocks, start=1):
                if index < self.config.dpam_from:
                    x = block(x)
                else:
                    x, x_vv = dual_block(block, x, x if x_vv is None else x_vv)
                if index in layers:
                    taps.append(x if x_vv is None else x_vv)
            patches = torch.stack(taps)  # (L, B, 1 + N, W), layers in increasing order
            return VisionFeatures(global_embedding=x[:, 0] @ visual.proj,
                                  patch_features=visual.ln_post(patches) @ visual.proj)

    def local_probabilities(self, patch_features: torch.Tensor, text: torch.Tensor,
                            size: Sequence[int]) -> torch.Tensor:
        """(L, B, 1 + N, D) patch features -> (B, L, 2, H, W): softmax per token, CLS dropped, then bilinear
        upsampling (align_corners False) of both channels to `size`."""
        grid = tuple(self.clip.visual.grid_size)
        probs = probabilities(patch_features, text, self.config.temperature)[:, :, 1:]  # (L, B, N, 2)
        maps = probs.unflatten(2, grid).permute(1, 0, 4, 2, 3)  # (B, L, 2, h, w)
        upsampled = F.interpolate(maps.flatten(0, 1), size=tuple(size), mode="bilinear", align_corners=False)
        return upsampled.unflatten(0, maps.shape[:2])

    # -- text ---------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """(2, D) unit [t_n, t_a]. Recomputed whenever it may carry a gradient (training); otherwise cached,
        keyed by the prompt tensors' in-place version counters, so an optimiser step or a loaded state refreshes
        it."""
        if self.training or torch.is_grad_enabled():
            return self.encode_text()
        key = tuple((p.device, p.dtype, p._version) for p in self.prompts.parameters())
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, self.encode_text())
        return self._text_cache[1]

    def encode_text(self) -> torch.Tensor:
        """Both learned prompts through the text tower with the deep tokens (BASELINES 3b.5), in float32."""
        clip, tokens, n = self.clip, self.tokens, self.config.prompt_length
        with float32(tokens.device):
            embedded = clip.token_embedding(tokens)
            context = torch.stack([self.prompts.ctx_pos, self.prompts.ctx_neg]).to(embedded.dtype)
            x = torch.cat([embedded[:, :1], context, embedded[:, 1 + n:]], dim=1) + clip.positional_embedding
            for index, block in enumerate(clip.transformer.resblocks, start=1):
                if 2 <= index <= self.config.deep_prompt_depth:
                    x = overwrite_prefix(x, self.prompts.deep[index - 2], self.config.deep_prompt_fp16)
                x = block(x, attn_mask=clip.attn_mask)
            eot = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
            return F.normalize(eot @ clip.text_projection, dim=-1)


def overwrite_prefix(x: torch.Tensor, tokens: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Replace positions 1..m of every sequence of x (P, L, W) by the (m, W) tokens (the official deep prompts).

    `fp16` rounds them through float16 after the expansion, as the official code does, so that even the
    gradient rounds as there (per sequence, before the sum over the prompts)."""
    expanded = tokens.expand(x.shape[0], -1, -1)
    expanded = expanded.half() if fp16 else expanded
    return torch.cat([x[:, :1], expanded.to(x.dtype), x[:, 1 + tokens.shape[0]:]], dim=1)


def _local_terms(probs: torch.Tensor, mask: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One (2, H, W) map against its (H, W) mask: the focal loss and Dice(S_a, G) + Dice(S_n, 1 - G)."""
    p, g = probs[None], mask[None]
    return clamped_focal_loss(p, g, gamma), dice_loss(p[:, 1], g, "release") + dice_loss(p[:, 0], 1 - g, "release")
