"""AdaCLIP (Cao et al., ECCV 2024): hybrid learnable prompts in both CLIP branches, hybrid semantic fusion.

Facts from the official code, github.com/caoyunkang/AdaCLIP at e27ee32b (method/adaclip.py, method/trainer.py,
train.py, test.py, loss.py); nothing of it is copied here.
- backbone: the OpenAI CLIP built from the plain model config, i.e. exact GELU (`quick_gelu: false`), the visual
  position table loaded at the native grid and resized bicubic (align_corners False, no antialias);
- prompts (prompting_branch V / L / VL, prompting_type S / D / SD, prompting_length n, prompting_depth J): a
  context (J, n, W) per branch = static tokens (N(0, 0.02^2)) + dynamic tokens, the latter one Linear(D -> W)
  per context position applied to the frozen CLIP's own (unprompted, unnormalised) image embedding, the same
  for every block. Vision: before block 1 the n tokens are appended after the patch tokens (no position
  embedding); before blocks 2..J the last n tokens are replaced; every block's output without them is its
  token set. Text: blocks 2..J have positions 1..n (right after SOT) overwritten; block 1 and its static
  tokens see the plain sentence (those tokens are trainable but unused, as there). Both contexts are rounded
  through float16 where they enter (`prompt_fp16`, the code's `.half()`);
- text: per image, the states of April-GAN's ensemble (7 normal, 5 anomalous) in the first 4 April-GAN
  templates around the class folder name ('-' read as ' '); per state list the mean of the unit embeddings,
  normalised. The text depends on the image through the dynamic tokens, so every image has its own anchors;
- vision heads: feature layers 6 12 18 24 (quarters of the depth), raw residual-stream patch tokens (no ln_post)
  through one Linear(W -> D) per layer, normalised; the image embedding ln_post(CLS) @ proj of the prompted pass
  through Linear(D -> D), normalised. Logits = 100 * cos with [t_n, t_a];
- HSF (the code's "upgraded" version, its comment says; the paper's is `hsf_variant: paper`, below): softmax
  of the layer-mean logits gives each patch an anomaly probability; the k = min(N, 5 * k_clusters) most
  anomalous patches, their projected tokens of all layers concatenated, are clustered by scikit-learn's KMeans
  (k-means++ init, one init, Lloyd, 300 iterations, tol 1e-4); the fused embedding is the mean over clusters of
  each cluster's mean token (over its members and the layers), normalised; image embedding = normalise(0.2 *
  fused + 0.8 * cls). Its gradient reaches the patch projections in training (the code does not detach it);
- image score softmax(100 [<f,t_n>, <f,t_a>])[1]. Map at test: the layer mean of the upsampled logits
  (bilinear, align_corners True), softmax, (p_a + 1 - p_n) / 2, then scipy's gaussian_filter with sigma 4 on the
  full-size map. No per-class normalisation (its metrics read the raw values);
- training: focal(image probabilities, label) + sum over layers of [focal(upsampled per-layer softmax, G) +
  Dice(p_a, G) + Dice(p_n, 1 - G)], focal and Dice as April-GAN's (clamped 1e-5, Dice smoothing 1); AdamW
  (lr 0.01, betas 0.5 / 0.999), 5 epochs, batch 1 (the code refuses others), 518 px, seed 111.

Decisions and differences:
- k-means: the code leaves KMeans unseeded (numpy's global state, seeded once by setup_seed(111)); here each
  image is clustered with `random_state = kmeans_seed`, so the same image gives the same score whatever the
  batch, and no global RNG moves. An empty cluster (only with duplicate tokens) would make the code's score
  NaN; here it is left out of the mean;
- HSF: the code's version is the default (`hsf_variant: code`); the paper's (kept commented out in the code:
  k-means over every patch's layer-mean token, the centroid of the cluster with the highest mean anomaly
  probability, normalised) is `hsf_variant: paper`;
- Dice: with batch 1 the code's `gt.squeeze()` drops the batch axis, so BinaryDiceLoss treats each image row as
  a sample: the Dice is the mean over rows of a per-row Dice (`dice_unit: row`, the default as the code runs);
  `dice_unit: image` is one Dice per image (the code with batch > 1, the paper's formula);
- batches: the code supports batch 1 only (its dynamic text tokens broadcast over the batch); here each image
  has its own dynamic tokens and text, which equals the code at batch 1;
- the test map softmaxes the mean of the upsampled logits; here the logits are averaged before the (linear)
  upsampling: equal up to float rounding, one interpolation instead of four;
- the optimiser: the generic trainer's Adam has no decoupled weight decay (AdamW's default 0.01): see the
  report; the rest of the schedule is as the code's;
- the text sequences are cut after the batch's last EOT token: with causal attention nothing after it reaches
  an EOT, so the features are the same (up to float rounding) at a fraction of the 77-token cost;
- a generator exists only for a prompted branch (the code builds both whenever D is on; same count with VL);
- samples whose mask is unknown train only the image term (as in April-GAN / AnomalyCLIP here).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from sklearn.cluster import KMeans
from torch import nn

from moeclip.backbone import load_clip
from moeclip.config import BackboneConfig, Domain
from moeclip.losses import clamped_focal_loss, dice_loss, mean_over_known
from moeclip.methods.anomalyclip import gaussian_blur, native_image_size, resize_positions
from moeclip.methods.base import ClassText, ZeroShotMethod, class_texts
from moeclip.methods.precision import float32
from moeclip.methods.prompts import ADACLIP_TEMPLATES, APRIL_GAN_ANOMALOUS_STATES, NORMAL_STATES, ensemble
from moeclip.methods.scoring import similarity_logits, training_maps
from moeclip.methods.targets import Targets


class AdaCLIPConfig(BackboneConfig):
    """Everything that defines an AdaCLIP network and its losses; every value comes from params.yaml."""

    position_resize: Literal["bicubic", "bicubic_antialias"] = Field(
        description="how the visual position table reaches image_size: bicubic from the weights' own grid without "
                    "antialias (official), or open_clip's bicubic with antialias (force_image_size)")
    class_text: ClassText = Field(description="folder: raw class folder names, as the official datasets give")
    feature_layers: tuple[int, ...] = Field(
        description="1-indexed blocks whose patch tokens are projected (6 12 18 24)")
    prompting_branch: Literal["V", "L", "VL"] = Field(description="branches with learnable prompts (VL)")
    prompting_type: Literal["S", "D", "SD"] = Field(description="static, dynamic or both (SD)")
    prompting_length: int = Field(ge=1, description="context tokens per prompted block (5)")
    prompting_depth: int = Field(ge=1, description="blocks 1..J carry prompts (4; text: 2..J)")
    prompt_fp16: bool = Field(description="round the contexts through float16 as the official code does")
    use_hsf: bool = Field(description="hybrid semantic fusion of the image embedding (true)")
    k_clusters: int = Field(ge=1, description="k-means clusters of HSF (20)")
    hsf_tokens_per_cluster: int = Field(
        ge=1, description="HSF clusters the k_clusters * this most anomalous patches (5)")
    hsf_variant: Literal["code", "paper"] = Field(
        description="code: the official code's 'upgraded' HSF (top patches, mean of cluster means); paper: the "
                    "centroid of the most anomalous cluster of all patches")
    hsf_alpha: float = Field(ge=0, le=1, description="weight of the fused embedding against the CLS one (0.2)")
    kmeans_seed: int = Field(description="random_state of every image's k-means (the code: unseeded)")
    logit_scale: float = Field(gt=0, description="scale of the cosines (100)")
    sigma: float = Field(gt=0, description="Gaussian on the full-size test map, in pixels (4)")
    focal_gamma: float = Field(description="gamma of the image and pixel focal losses (2)")
    dice_unit: Literal["row", "image"] = Field(
        description="row: the code at batch 1 (a Dice per image row, averaged); image: one Dice per image")

    @model_validator(mode="after")
    def _consistent(self) -> AdaCLIPConfig:
        layers = self.feature_layers
        if not layers or min(layers) < 1 or list(layers) != sorted(set(layers)):
            raise ValueError(f"feature_layers must be strictly increasing 1-indexed blocks, got {layers}")
        return self


@dataclass
class AdaCLIPOutputs:
    """What a training step's losses need: image probabilities (B, 2) and per-layer maps (B, L, 2, H, W)."""

    image_probabilities: torch.Tensor
    layer_maps: torch.Tensor


class PromptGenerator(nn.Module):
    """Dynamic tokens: one Linear(D -> W) per context position on the (B, D) image embedding -> (B, n, W)."""

    def __init__(self, embed_dim: int, width: int, length: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(embed_dim, width) for _ in range(length))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(embedding) for head in self.heads], dim=1)


class BranchPrompts(nn.Module):
    """One branch's contexts: static (J, n, W) tokens and/or a dynamic generator, as `prompting_type` says."""

    def __init__(self, kind: str, depth: int, length: int, width: int, embed_dim: int) -> None:
        super().__init__()
        self.static = nn.Parameter(torch.empty(depth, length, width).normal_(std=0.02)) if "S" in kind else None
        self.dynamic = PromptGenerator(embed_dim, width, length) if "D" in kind else None
        self.depth = depth

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(J, B, n, W) contexts for a batch of (B, D) image embeddings: static + dynamic."""
        batch = embedding.shape[0]
        static = 0 if self.static is None else self.static[:, None]
        dynamic = 0 if self.dynamic is None else self.dynamic(embedding)[None]
        context = static + dynamic
        return context.expand(self.depth, batch, -1, -1)


def kmeans_labels(points: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """(k,) cluster of each of k (k, F) points by scikit-learn's KMeans as the official code runs it (k-means++,
    one init, which n_init='auto' means there, Lloyd), seeded."""
    kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=seed)
    labels = kmeans.fit_predict(points.detach().float().cpu().numpy())
    return torch.as_tensor(labels, dtype=torch.long, device=points.device)


def cluster_weights(points: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """(k,) weight of each of k (k, F) points in HSF's mean over clusters of cluster means: 1 / (C * size of its
    cluster), C the non-empty clusters."""
    labels = kmeans_labels(points, clusters, seed)
    sizes = torch.bincount(labels, minlength=clusters)
    return 1 / (sizes[labels] * (sizes > 0).sum()).to(points.dtype)


def hybrid_semantic_fusion(patches: torch.Tensor, logits: torch.Tensor, config: AdaCLIPConfig) -> torch.Tensor:
    """(B, D) unit fused embedding from unit patch tokens (B, L, N, D) and their logits (B, L, 2, N), both
    variants ranking patches by the softmax of the layer-mean logits.

    code: the k_clusters * hsf_tokens_per_cluster most anomalous patches, clustered on their layers' tokens
    concatenated, averaged per cluster, the cluster means averaged; paper: every patch's layer-mean token
    clustered, the centroid of the cluster with the highest mean anomaly probability."""
    _, layers, count, dim = patches.shape
    anomalous = logits.mean(dim=1).softmax(dim=1)[:, 1]  # (B, N)
    if config.hsf_variant == "paper":
        return F.normalize(torch.stack([_most_anomalous_centroid(tokens, scores, config)
                                        for tokens, scores in zip(patches.mean(dim=1), anomalous)]), dim=-1)
    top = anomalous.topk(min(count, config.k_clusters * config.hsf_tokens_per_cluster), dim=1).indices
    selected = patches.gather(2, top[:, None, :, None].expand(-1, layers, -1, dim))  # (B, L, k, D)
    concatenated = selected.transpose(1, 2).flatten(2)  # (B, k, L * D), layer-major per token
    weights = torch.stack([cluster_weights(points, config.k_clusters, config.kmeans_seed) for points in concatenated])
    return F.normalize(torch.einsum("bk,blkd->bd", weights, selected) / layers, dim=-1)


def _most_anomalous_centroid(tokens: torch.Tensor, scores: torch.Tensor, config: AdaCLIPConfig) -> torch.Tensor:
    """The paper's HSF for one image: (N, D) tokens clustered, the mean token of the cluster whose members' mean
    anomaly probability (N,) is highest."""
    members = F.one_hot(kmeans_labels(tokens, config.k_clusters, config.kmeans_seed), config.k_clusters).T.float()
    sizes = members.sum(dim=1)
    cluster_scores = torch.where(sizes > 0, members @ scores / sizes.clamp_min(1), -torch.inf)
    best = members[cluster_scores.argmax()]
    return best @ tokens / best.sum()


class AdaCLIP(ZeroShotMethod):
    """AdaCLIP on a frozen open_clip ViT: prompts in both branches, per-layer projections, HSF."""

    name = "adaclip"
    config_class = AdaCLIPConfig

    def __init__(self, config: AdaCLIPConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        self.check_layers(config.feature_layers)
        visual = clip.visual
        depth = min(len(visual.transformer.resblocks), len(clip.transformer.resblocks))
        if config.prompting_depth > depth:
            raise ValueError(f"prompting_depth {config.prompting_depth} exceeds the {depth} blocks of "
                             f"{config.backbone}")
        tokens = visual.grid_size[0] * visual.grid_size[1]
        if config.use_hsf and tokens < config.k_clusters:
            raise ValueError(f"HSF clusters {tokens} patches of {config.backbone} at {config.image_size} px into "
                             f"k_clusters {config.k_clusters}: too few patches")
        width, embed_dim, text_width = visual.conv1.out_channels, visual.output_dim, clip.ln_final.normalized_shape[0]
        prompts = partial(BranchPrompts, config.prompting_type, config.prompting_depth, config.prompting_length)
        self.visual_prompts = prompts(width, embed_dim) if "V" in config.prompting_branch else None
        self.text_prompts = prompts(text_width, embed_dim) if "L" in config.prompting_branch else None
        # PyTorch's default nn.Linear init, as the official ProjectLayer.
        self.patch_projections = nn.ModuleList(nn.Linear(width, embed_dim) for _ in config.feature_layers)
        self.cls_projection = nn.Linear(embed_dim, embed_dim)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}
        self._token_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load_backbone(cls, config: AdaCLIPConfig) -> nn.Module:
        """With `position_resize: bicubic` CLIP is loaded at its native size and its position table resized as
        the official loader does (open_clip would add antialias)."""
        if config.position_resize == "bicubic_antialias":
            return super().load_backbone(config)
        clip = load_clip(config.backbone, native_image_size(config.backbone), config.weights, config.quick_gelu)
        resize_positions(clip.visual, config.image_size, "bicubic")
        return clip

    # -- prompts and towers -------------------------------------------------------------------
    def _entering(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Context tokens as they enter a sequence: rounded through float16 if configured, per block and per
        sequence as the official `.half()` does, so that even their gradients round as there."""
        return (tokens.half() if self.config.prompt_fp16 else tokens).to(dtype)

    def encode_image(self, images: torch.Tensor,
                     context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompted vision pass: the (B, D) image embedding ln_post(CLS) @ proj and the (L, B, N, W) raw patch
        tokens of the feature layers (CLS and context tokens dropped)."""
        visual, n = self.clip.visual, self.config.prompting_length
        x = visual._embeds(images)
        extra = 0 if context is None else n
        taps = []
        for index, block in enumerate(visual.transformer.resblocks):
            if context is not None and index < context.shape[0]:
                x = torch.cat([x if index == 0 else x[:, :-n], self._entering(context[index], x.dtype)], dim=1)
            x = block(x)
            if index + 1 in self.config.feature_layers:
                taps.append(x[:, 1:x.shape[1] - extra])
        return visual.ln_post(x[:, 0]) @ visual.proj, torch.stack(taps)

    def _class_tokens(self, text: str) -> torch.Tensor:
        """(P, context) tokens of one class's prompts: the normal ensemble, then the anomalous one (tokenised once
        per class text)."""
        if text not in self._token_cache:
            name = text.replace("-", " ")
            sentences = ensemble(name, NORMAL_STATES, ADACLIP_TEMPLATES) + \
                ensemble(name, APRIL_GAN_ANOMALOUS_STATES, ADACLIP_TEMPLATES)
            self._token_cache[text] = self.tokenizer(sentences)
        return self._token_cache[text]

    def encode_text(self, tokens: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """(B, P, D) unit prompt embeddings of (B, P, context) tokens, sample b's sequences with its (J, B, n, W)
        context overwriting positions 1..n before blocks 2..J."""
        clip, n = self.clip, self.config.prompting_length
        batch, count = tokens.shape[:2]
        flat = tokens.flatten(0, 1)
        # Causal attention: no position after the last EOT reaches an EOT, so the sequences end there.
        length = max(int(flat.argmax(dim=-1).max()) + 1, n + 1)
        flat, mask = flat[:, :length], clip.attn_mask[:length, :length]
        with float32(tokens.device):
            x = clip.token_embedding(flat) + clip.positional_embedding[:length]
            for index, block in enumerate(clip.transformer.resblocks):
                if context is not None and 1 <= index < context.shape[0]:
                    inserted = self._entering(context[index].float().repeat_interleave(count, dim=0), x.dtype)
                    x = torch.cat([x[:, :1], inserted, x[:, 1 + n:]], dim=1)
                x = block(x, attn_mask=mask)
            eot = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), flat.argmax(dim=-1)]
            return F.normalize(eot @ clip.text_projection, dim=-1).unflatten(0, (batch, count))

    def text_features(self, texts: Sequence[str], context: torch.Tensor | None) -> torch.Tensor:
        """(B, 2, D) unit [t_n, t_a] per sample: per state list the mean of the unit prompt embeddings, normalised.
        Without text prompts the text is fixed and encoded once per class text."""
        device = self.clip.text_projection.device
        if context is None:
            for text in dict.fromkeys(texts):
                if text not in self._text_cache:
                    with torch.no_grad():
                        tokens = self._class_tokens(text)[None].to(device)
                        self._text_cache[text] = self._states(self.encode_text(tokens, None))[0]
            return torch.stack([self._text_cache[text] for text in texts])
        tokens = torch.stack([self._class_tokens(text) for text in texts]).to(device)
        return self._states(self.encode_text(tokens, context))

    @staticmethod
    def _states(prompts: torch.Tensor) -> torch.Tensor:
        """(B, P, D) unit embeddings, normal prompts first -> (B, 2, D) unit state anchors."""
        normal = len(NORMAL_STATES) * len(ADACLIP_TEMPLATES)
        return F.normalize(torch.stack([prompts[:, :normal].mean(dim=1), prompts[:, normal:].mean(dim=1)], dim=1),
                           dim=-1)

    # -- the shared forward ---------------------------------------------------------------------
    def _forward(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) image probabilities and (B, L, 2, N) patch logits."""
        with torch.no_grad():
            embedding = self.clip.visual(images)  # the frozen, unprompted CLIP embedding feeds the generators
        visual, textual = (None if prompts is None else prompts(embedding)
                           for prompts in (self.visual_prompts, self.text_prompts))
        pooled, taps = self.encode_image(images, visual)
        text = self.text_features(texts, textual)
        patches = torch.stack([F.normalize(projection(tokens), dim=-1)
                               for projection, tokens in zip(self.patch_projections, taps)], dim=1)
        with float32(images):
            patches = patches.float()
            logits = similarity_logits(patches, text, self.config.logit_scale)  # (B, L, 2, N)
            image = F.normalize(self.cls_projection(pooled.float()), dim=-1)
            if self.config.use_hsf:
                fused = hybrid_semantic_fusion(patches, logits, self.config)
                image = F.normalize(self.config.hsf_alpha * fused + (1 - self.config.hsf_alpha) * image, dim=-1)
            image_logits = self.config.logit_scale * torch.einsum("bd,bkd->bk", image, text)
            return image_logits.softmax(dim=-1), logits

    # -- the method's protocol (moeclip/methods/base.py) -----------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        return class_texts(batch, self.config.class_text)

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, H, W): softmax of the layer-mean upsampled logits, (p_a + 1 - p_n) / 2, Gaussian; image scores
        (B,): the anomalous probability of the fused embedding. One rule for both domains."""
        probabilities, logits = self._forward(images, texts)
        grid = tuple(self.clip.visual.grid_size)
        with float32(images):
            mean = logits.mean(dim=1).unflatten(-1, grid)  # (B, 2, h, w)
            upsampled = F.interpolate(mean, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=True)
            states = upsampled.softmax(dim=1)
            maps = (states[:, 1] + 1 - states[:, 0]) / 2
            return gaussian_blur(maps, self.config.sigma), probabilities[:, 1]

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> AdaCLIPOutputs:
        probabilities, logits = self._forward(images, texts)
        return AdaCLIPOutputs(probabilities, training_maps(logits, tuple(self.clip.visual.grid_size), images.shape[-1]))

    def training_losses(self, outputs: AdaCLIPOutputs, targets: Targets) -> dict[str, torch.Tensor]:
        """focal(image probabilities, label) over every sample + the per-layer sum of focal + Dice(p_a, G) +
        Dice(p_n, 1 - G), a mean over the samples whose mask is known (0 if none)."""
        probabilities = outputs.image_probabilities.float()
        image = clamped_focal_loss(probabilities[:, :, None, None], targets.labels.float()[:, None, None],
                                   self.config.focal_gamma)
        masks = (targets.masks > 0.5).float()
        terms = torch.vmap(torch.vmap(partial(_pixel_terms, gamma=self.config.focal_gamma, unit=self.config.dice_unit),
                                      in_dims=(0, None)))
        focal, dice = (term.sum(dim=1) for term in terms(outputs.layer_maps.float(), masks))  # (B,) each
        focal, dice = mean_over_known(focal, targets.known), mean_over_known(dice, targets.known)
        segmentation = focal + dice
        return {"loss": image + segmentation, "image_loss": image, "segmentation_loss": segmentation,
                "focal_loss": focal, "dice_loss": dice}


def _pixel_terms(probs: torch.Tensor, mask: torch.Tensor, gamma: float,
                 unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One (2, H, W) map against its (H, W) mask: the focal loss and Dice(p_a, G) + Dice(p_n, 1 - G), each Dice a
    mean over the image's rows (`row`: (H, W) read as H samples) or one per image."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x if unit == "row" else x[None]

    focal = clamped_focal_loss(probs[None], mask[None], gamma)
    dice = dice_loss(rows(probs[1]), rows(mask), "release") + dice_loss(rows(probs[0]), rows(1 - mask), "release")
    return focal, dice
