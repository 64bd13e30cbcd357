"""WMoE-CLIP (approximation): wavelet cross-modal attention, VAE-conditioned prompts and a semantic-aware MoE.

THIS IS AN APPROXIMATION, NOT THE PAPER'S METHOD. Only the abstract, the Fig. 1 roles, two wavelet equations
(F_H = F_LH + F_HL + F_HH; F_p = F_H * W_h + F_L, Haar, on CLIP features) and nine result numbers of
WMoE-CLIP (Chen and Huang, arXiv 2603.06313) are public; everything else follows the default design of
../shared/WMOE_CLIP.md section 6, taken from CoPS, Bayes-PFL and AnomalyCLIP. Its numbers must not be reported
as the paper's. The assumptions, numbered as in WMOE_CLIP.md section 7:
  1. The acronyms are used as names: WCMA = wavelet cross-modal attention, SA-MoE = semantic-aware MoE,
     CTDS = the VAE that conditions the prompts.
  2. Backbone: OpenCLIP ViT-L-14-336, OpenAI weights, 518 px (37x37 patches), both towers frozen.
  3. Patch tokens of blocks 6/12/18/24 (`feature_layers`, 1-indexed).
  4. No attention surgery (no V-V / DPAM path); each layer gets a trainable bias-free linear map after ln_post,
     then L2 normalisation (MoECLIP's `SegmentationProjections`, xavier-uniform).
  5. Prompts "[c_1..c_M] object." / "[c_1..c_M] damaged object." with M = 12 learnable context vectors per state,
     N(0, 0.02^2); no deep text prompts. `prompt_object: description` puts the class description in place of
     "object". Text embedding: EOT token after ln_final and CLIP's frozen text projection, L2-normalised.
  6. CTDS input: the CLS token after ln_post and CLIP's frozen visual projection, L2-normalised (g).
  7. CTDS: encoder D -> hidden (ReLU) -> mu, log sigma^2 in R^latent; decoder latent -> hidden (ReLU) -> D.
  8. CTDS output u is added as one bias to every context vector of both states (`ctds_injection: direct`,
     needs text width = embedding width); `projected` first maps u by a zero-initialised bias-free linear map
     into token space (the tiny demo backbone, whose widths differ).
  9. L_KL = KL(N(mu, sigma^2) || N(0, I)) summed over dims, weight beta_kl = 0.01; L_rec = ||u - g||^2 summed
     over dims, weight beta_rec = 1; both averaged over the batch.
 10. CTDS at test time (eval mode) uses the posterior mean z = mu; training (train mode) reparameterises.
 11. One DWT level, replicate padding of the last row/column to an even grid (37 -> 38).
 12. The DWT sees each layer's projected, L2-normalised patch tokens.
 13. W_h is a per-channel learnable vector per layer, initialised to 1. Haar signs per 2x2 block [p q; r s]:
     LL = (p+q+r+s)/2, LH = (p-q+r-s)/2, HL = (p+q-r-s)/2, HH = (p-q-r+s)/2 (orthonormal); F_H is the signed sum.
 14. WCMA: T' = normalize(T + softmax(Q K^T / sqrt(D)) V) with Q = T W_q + b (D x D), K = V = the L2-normalised
     F_p tokens, `attention_heads` heads splitting the channels, no key/value/output projections.
 15. Each layer's refined text scores that layer's (full-resolution) patch tokens: pixel logits
     [cos(Z_l, t'_n), cos(Z_l, t'_a)] / temperature (0.07).
 16. SA-MoE: K = 4 experts, each a learnable-query attention pooling over the layer-mean patch tokens followed by
     an MLP D -> `expert_hidden` (D/4) -> D with GELU.
 17. Gate: dense softmax over experts of a linear map of [g; t_n; t_a] (the CTDS-conditioned, unrefined text);
     v = normalize(g + sum_k pi_k o_k).
 18. No load-balancing loss.
 19. Image score: softmax([cos(v, t_n), cos(v, t_a)] / temperature)[anomalous], not fused with the map.
 20. Segmentation loss per layer: AnomalyCLIP's clamped focal loss (gamma = focal_gamma) + Dice(anomalous,
     mask) + Dice(normal, 1 - mask) with smoothing 1 (AnomalyCLIP's Dice), summed over layers, weight lambda_seg,
     on bilinearly upsampled (align_corners) then softmaxed maps; averaged over the samples whose mask is known.
 21. Classification loss: 2-way cross-entropy on the image logits above.
 22. Adam(0.5, 0.999), lr 1e-3, batch 8, 15 epochs, no scheduler (params.yaml's train section).
 23. Auxiliary training set: a params.yaml choice (the AnomalyCLIP protocol trains on MVTec AD).
 24. The 14 datasets: not fixed here (params.yaml); a guess from the Bayes-PFL loaders.
 25. Metrics: AUROC and AP at both levels (the benchmark's metric set).
 26. Test map: mean over layers of the anomalous-channel probability at input size, then a Gaussian blur of
     `sigma` (4; kernel radius round(4 sigma) as scipy's default truncation) on that map; the same for both
     domains; no per-class normalisation (the base class's protocol_scores).
 27. Table 1 (beyond nine cells) and Table 2 are unknown: only this implementation's numbers may be published.
 28. Size: about 10 M trainable parameters at paper size; not comparable to the paper's (unknown) count.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from moeclip.config import BackboneConfig, Domain
from moeclip.losses import clamped_focal_loss, dice_loss, mean_over_known
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.targets import Targets
from moeclip.methods.heads import SegmentationProjections
from moeclip.methods.precision import float32
from moeclip.methods.prompts import CONTEXT_PLACEHOLDER

ABNORMAL_WORD = "damaged"
DICE_KIND = "release"  # AnomalyCLIP's Dice: smoothing 1 in numerator and denominator (assumption 20)


class WMoECLIPConfig(BackboneConfig):
    """The `model` section of a WMoE-CLIP profile (every value from params.yaml; module docstring for meanings)."""

    feature_layers: tuple[int, ...] = Field(description="1-indexed ViT blocks whose patch tokens are used")
    prompt_length: int = Field(ge=1, description="learnable context vectors per state prompt")
    prompt_object: Literal["object", "description"] = Field(
        description="the word after the context: class-agnostic 'object' or the class description")
    latent_dim: int = Field(ge=1, description="CTDS latent size")
    vae_hidden: int = Field(ge=1, description="CTDS encoder and decoder hidden width")
    ctds_injection: Literal["direct", "projected"] = Field(
        description="direct: u added to the context vectors; projected: through a zero-initialised linear map")
    experts: int = Field(ge=1)
    expert_hidden: int = Field(ge=1, description="bottleneck width of each SA-MoE expert's MLP")
    attention_heads: int = Field(ge=1, description="WCMA heads")
    temperature: float = Field(gt=0)
    beta_kl: float = Field(ge=0)
    beta_rec: float = Field(ge=0)
    lambda_seg: float = Field(ge=0)
    focal_gamma: float = Field(description="gamma of the segmentation's focal loss (assumption 20)")
    sigma: float = Field(gt=0, description="Gaussian blur of the test map, in input pixels")

    @model_validator(mode="after")
    def _layers(self) -> WMoECLIPConfig:
        layers = self.feature_layers
        if not layers or layers[0] < 1 or list(layers) != sorted(set(layers)):
            raise ValueError(f"feature_layers must be increasing 1-indexed blocks, got {layers}")
        return self


# -- equations ---------------------------------------------------------------------------------------------
def haar_dwt(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2-D Haar DWT of (B, C, H, W) -> LL, LH, HL, HH, each (B, C, ceil(H/2), ceil(W/2)).

    An odd last row/column is replicated first, so a 37x37 patch grid gives 19x19 sub-bands.
    """
    grid = F.pad(grid, (0, grid.shape[-1] % 2, 0, grid.shape[-2] % 2), mode="replicate")
    p, q = grid[..., 0::2, 0::2], grid[..., 0::2, 1::2]
    r, s = grid[..., 1::2, 0::2], grid[..., 1::2, 1::2]
    return (p + q + r + s) / 2, (p - q + r - s) / 2, (p + q - r - s) / 2, (p - q - r + s) / 2


def frequency_enhanced(grid: torch.Tensor, high_weight: torch.Tensor) -> torch.Tensor:
    """F_p = F_H * W_h + F_L with F_H = LH + HL + HH (signed) and F_L = LL: (B, C, H, W), (C,) -> sub-band grid."""
    low, lh, hl, hh = haar_dwt(grid)
    return (lh + hl + hh) * high_weight[:, None, None] + low


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over the latent dims, averaged over the batch."""
    return (-0.5 * (1 + log_var - mean.pow(2) - log_var.exp())).sum(dim=-1).mean()


def blur_kernel_size(sigma: float) -> int:
    """scipy.ndimage.gaussian_filter's support (truncate = 4), as AnomalyCLIP blurs its maps."""
    return 2 * int(4 * sigma + 0.5) + 1


def prompt_tokens(tokenizer, objects: Sequence[str], length: int) -> torch.Tensor:
    """(B, 2, n) tokens of "[X]*length object." and "[X]*length damaged object." per sample, cut after the
    longest EOT: the causal text transformer's EOT output does not depend on the padding behind it."""
    prefix = " ".join([CONTEXT_PLACEHOLDER] * length)
    texts = [text for name in objects for text in (f"{prefix} {name}.", f"{prefix} {ABNORMAL_WORD} {name}.")]
    tokens = tokenizer(texts)
    return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1].unflatten(0, (len(objects), 2))


def encode_prompts(clip: nn.Module, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Unit text embeddings (B, 2, D) of (B, 2, n) tokens whose placeholders 1..M are replaced by the
    per-image (B, 2, M, W) context vectors (the frozen text tower, EOT pooling, CLIP's text projection)."""
    embedded = clip.token_embedding(tokens)
    length, n = context.shape[2], tokens.shape[-1]
    x = torch.cat([embedded[:, :, :1], context.to(embedded.dtype), embedded[:, :, 1 + length:]], dim=2).flatten(0, 1)
    x = x + clip.positional_embedding[:n].to(x.dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    flat = tokens.flatten(0, 1)
    eot = x[torch.arange(flat.shape[0], device=x.device), flat.argmax(dim=-1)]
    with float32(eot):  # the anchors decide every score: no bf16 rounding here
        return F.normalize(eot.float() @ clip.text_projection.float(), dim=-1).unflatten(0, tokens.shape[:2])


# -- modules -----------------------------------------------------------------------------------------------
@dataclass
class CTDSOutput:
    """The decoded bias u (B, D) and the posterior's mean and log-variance (B, latent)."""

    bias: torch.Tensor
    mean: torch.Tensor
    log_var: torch.Tensor


class CTDS(nn.Module):
    """VAE on the global feature g; its decoded u conditions the prompts (assumptions 6-10)."""

    def __init__(self, dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, latent)
        self.log_var = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, global_feature: torch.Tensor) -> CTDSOutput:
        """Reparameterised z = mu + sigma * eps in training, the posterior mean at test time."""
        hidden = self.encoder(global_feature)
        mean, log_var = self.mean(hidden), self.log_var(hidden)
        latent = mean + (0.5 * log_var).exp() * torch.randn_like(mean) if self.training else mean
        return CTDSOutput(self.decoder(latent), mean, log_var)


class StatePrompts(nn.Module):
    """The normal and abnormal learnable context vectors, shifted per image by the CTDS bias (assumptions 5, 8)."""

    def __init__(self, length: int, width: int, embed_dim: int, injection: str) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.randn(2, length, width) * 0.02)
        if injection == "projected":
            self.injection = nn.Linear(embed_dim, width, bias=False)
            nn.init.zeros_(self.injection.weight)
        elif embed_dim == width:
            self.injection = nn.Identity()
        else:
            raise ValueError(f"ctds_injection 'direct' needs text width {width} = embedding width {embed_dim}; "
                             f"use 'projected'")

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        """(B, D) CTDS bias -> (B, 2, M, W) per-image context vectors c + u."""
        return self.context + self.injection(bias)[:, None, None]


class WaveletCrossAttention(nn.Module):
    """WCMA of one layer: the text embeddings attend to the wavelet-enhanced patch tokens (assumptions 11-14)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention_heads={heads} does not divide the embedding width {dim}")
        self.heads = heads
        self.high_weight = nn.Parameter(torch.ones(dim))
        self.query = nn.Linear(dim, dim)

    def wavelet_tokens(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, L, D) patch tokens on `grid` -> (B, L', D) unit F_p tokens of the sub-band grid."""
        enhanced = frequency_enhanced(patches.transpose(1, 2).unflatten(-1, grid), self.high_weight)
        return F.normalize(enhanced.flatten(2).transpose(1, 2), dim=-1)

    def forward(self, text: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, 2, D) unit text embeddings -> refined unit embeddings normalize(T + attention)."""
        tokens = self.wavelet_tokens(patches, grid)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, n, D / heads)

        attended = F.scaled_dot_product_attention(split(self.query(text)), split(tokens), split(tokens),
                                                  scale=text.shape[-1] ** -0.5)
        return F.normalize(text + attended.transpose(1, 2).flatten(2), dim=-1)


class SemanticMoE(nn.Module):
    """SA-MoE: attention-pooling experts mixed by a gate on the global and text semantics (assumptions 16-17)."""

    def __init__(self, dim: int, experts: int, hidden: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(experts, dim) * 0.02)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                     for _ in range(experts))
        self.gate = nn.Linear(3 * dim, experts)

    def gate_probabilities(self, global_feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """pi = softmax over experts of W_g [g; t_n; t_a] + b_g: (B, K)."""
        return self.gate(torch.cat([global_feature, text.flatten(1)], dim=-1)).softmax(dim=-1)

    def forward(self, context: torch.Tensor, global_feature: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) context tokens -> the unit image embedding v = normalize(g + sum_k pi_k o_k) and pi."""
        attention = torch.einsum("bld,kd->bkl", context, self.queries).div(math.sqrt(context.shape[-1])).softmax(-1)
        pooled = attention @ context  # (B, K, D)
        outputs = torch.stack([expert(pooled[:, k]) for k, expert in enumerate(self.experts)], dim=1)
        gate = self.gate_probabilities(global_feature, text)
        return F.normalize(global_feature + (gate.unsqueeze(-1) * outputs).sum(dim=1), dim=-1), gate


# -- the method --------------------------------------------------------------------------------------------
@dataclass
class WMoEOutputs:
    """One forward: per-layer pixel logits on the patch grid, image logits and what the losses need."""

    pixel_logits: torch.Tensor  # (B, layers, 2, h, w) [normal, anomalous] / temperature
    image_logits: torch.Tensor  # (B, 2)
    global_feature: torch.Tensor  # (B, D) g
    ctds: CTDSOutput
    image_size: tuple[int, int]

    def pixel_probabilities(self) -> torch.Tensor:
        """(B, layers, 2, H, W): logits bilinearly upsampled to the input size, then softmaxed over the states."""
        upsampled = F.interpolate(self.pixel_logits.flatten(0, 1), size=self.image_size, mode="bilinear",
                                  align_corners=True)
        return upsampled.softmax(dim=1).unflatten(0, self.pixel_logits.shape[:2])


def segmentation_loss(maps: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sum over layers of focal + Dice(anomalous, mask) + Dice(normal, 1 - mask), per sample, averaged over the
    samples with a known mask: (B, layers, 2, H, W) probabilities, (B, H, W) masks, (B,) flags."""
    layers = maps.shape[1]
    per_sample = []
    for probs, mask in zip(maps.float(), masks.float()):
        target = mask.expand(layers, *mask.shape)
        per_sample.append(layers * (clamped_focal_loss(probs, target, gamma) + dice_loss(probs[:, 1], target, DICE_KIND)
                                    + dice_loss(probs[:, 0], 1 - target, DICE_KIND)))
    return mean_over_known(torch.stack(per_sample), known)


class WMoECLIP(ZeroShotMethod):
    """WMoE-CLIP as approximated in ../shared/WMOE_CLIP.md section 6 (see the module docstring)."""

    name = "wmoe_clip"
    config_class = WMoECLIPConfig

    def __init__(self, config: WMoECLIPConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        self.check_layers(config.feature_layers)
        visual = clip.visual
        self.grid = tuple(visual.grid_size)
        self.tokenizer = tokenizer
        width, embed_dim = visual.conv1.out_channels, visual.output_dim
        text_width = clip.ln_final.normalized_shape[0]
        self.projections = SegmentationProjections(config.feature_layers, width, embed_dim)
        self.prompts = StatePrompts(config.prompt_length, text_width, embed_dim, config.ctds_injection)
        self.ctds = CTDS(embed_dim, config.vae_hidden, config.latent_dim)
        self.wcma = nn.ModuleDict({str(layer): WaveletCrossAttention(embed_dim, config.attention_heads)
                                   for layer in config.feature_layers})
        self.moe = SemanticMoE(embed_dim, config.experts, config.expert_hidden)

    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        """What follows the context vectors: 'object' for every sample, or its class description."""
        if self.config.prompt_object == "object":
            return ["object"] * len(batch["class_name"])
        return list(batch["description"])

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen ViT -> (layers, B, L, D) unit projected patch tokens Z_l and the (B, D) unit global feature g."""
        visual = self.clip.visual
        with torch.no_grad():
            x = visual._embeds(images)
            features = []
            for index, block in enumerate(visual.transformer.resblocks, start=1):
                x = block(x)
                if index in self.config.feature_layers:
                    features.append(x[:, 1:])
            global_feature = F.normalize((visual.ln_post(x[:, 0]) @ visual.proj).float(), dim=-1)
            normed = visual.ln_post(torch.stack(features))
        return self.projections(normed).float(), global_feature

    def forward_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> WMoEOutputs:
        """The full forward (training and test alike; the mode only decides CTDS sampling)."""
        patches, global_feature = self.encode_image(images)
        tokens = prompt_tokens(self.tokenizer, texts, self.config.prompt_length).to(images.device)
        with float32(images):
            ctds = self.ctds(global_feature)
            context = self.prompts(ctds.bias)
        text = encode_prompts(self.clip, tokens, context)
        with float32(images):
            refined = torch.stack([self.wcma[str(layer)](text, patches[i], self.grid)
                                   for i, layer in enumerate(self.config.feature_layers)])  # (layers, B, 2, D)
            pixel = torch.einsum("lbnd,lbkd->blkn", patches, refined) / self.config.temperature
            embedding, _ = self.moe(patches.mean(dim=0), global_feature, text)
            image_logits = torch.einsum("bd,bkd->bk", embedding, text) / self.config.temperature
        return WMoEOutputs(pixel.unflatten(-1, self.grid), image_logits, global_feature, ctds, tuple(images.shape[-2:]))

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> WMoEOutputs:
        return self.forward_outputs(images, texts)

    def training_losses(self, outputs: WMoEOutputs, targets: Targets) -> dict[str, torch.Tensor]:
        """L = L_img + lambda_seg L_seg + beta_kl L_KL + beta_rec L_rec (assumptions 9, 20, 21), in float32."""
        image = F.cross_entropy(outputs.image_logits.float(), targets.labels.long())
        seg = segmentation_loss(outputs.pixel_probabilities(), targets.masks, targets.known,
                                 self.config.focal_gamma)
        kl = gaussian_kl(outputs.ctds.mean.float(), outputs.ctds.log_var.float())
        rec = (outputs.ctds.bias.float() - outputs.global_feature.float()).pow(2).sum(dim=-1).mean()
        weights = self.config
        total = image + weights.lambda_seg * seg + weights.beta_kl * kl + weights.beta_rec * rec
        return {"loss": total, "image_loss": image, "segmentation_loss": seg, "kl_loss": kl,
                "reconstruction_loss": rec}

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W) blurred mean anomalous-state probability over layers and (B,) image scores (assumptions 19, 26)."""
        outputs = self.forward_outputs(images, texts)
        with float32(images):
            mean_map = outputs.pixel_probabilities()[:, :, 1].mean(dim=1, keepdim=True)
            kernel = blur_kernel_size(self.config.sigma)
            maps = gaussian_blur(mean_map, [kernel, kernel], [self.config.sigma] * 2)[:, 0]
            return maps, outputs.image_logits.float().softmax(dim=-1)[:, 1]
