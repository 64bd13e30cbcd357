"""Bayes-PFL (Qu et al., CVPR 2025): Bayesian prompt flow learning on a frozen CLIP.

Facts from the official code, github.com/xiaozhen228/Bayes-PFL at 8f155a07 (models/VPB.py, PFL.py, flows.py,
transformer.py, loss.py, train.py, test.py, metric_and_visualization.py, train.sh, test.sh):
- prompts: a bank of B (prompt_num 3) prompts "[SOS] c_1..c_P s_1..s_Q <class name> [EOS]": the token "X" of
  "X <name>" is replaced by P (5) learned context vectors shared by the normal and the anomalous prompt and Q (5)
  learned state vectors, one set per state; the class name is the folder name through the official renaming
  (`CLASS_NAMES`), lower-cased. The EOS embedding through the text projection is the prompt's embedding;
- prompt flow: the context vectors are shifted by a sample z of the image-specific distribution (a Gaussian
  whose mean and log-variance are 3-layer softplus MLPs of the global image embedding, then K = 10 planar flows
  whose u, w, b are linear maps of that embedding); each state's vectors by a sample of an image-agnostic
  distribution (the same Gaussian MLPs, shared by both states, applied to a learned state vector; planar flows
  with learned u, w, b). The encoders' second output exp(h / 2) is used as the variance (std = exp(h / 4)), as
  the code does. Planar flow: z' = z + u tanh(w.z + b), log|det| = log(|1 + u.w (1 - tanh^2)| + 1e-5), with no
  invertibility constraint on u;
- residual cross-modal attention (RCA) per feature layer: the raw tokens of the 1-indexed blocks 6 12 18 24
  (no ln_post, no CLIP projection) go through a bias-free linear map to the embedding width and are
  L2-normalised (F_s); each text embedding t queries them (4 heads, a 1x1-conv query with bias, k = v = F_s,
  scale dim^-1/2 of the full width), t' = normalise(attention + t); map logits = exp(tau_pixel) F_s t'^T;
- image logits = exp(tau_image) <normalise(W t + b), normalise(g)> with g = ln_post(CLS) @ proj (stage 1);
- training, one step (train.py stage 1): one sample of each distribution (the two state samples shared by the
  batch); one prompt index drawn uniformly (torch.randint) selects the normal/anomalous pair that enters the
  image CE and the segmentation loss; per feature layer the pair's logits are upsampled bilinearly
  (align_corners True) to the input size and softmaxed, loss = focal (class-balanced: the mean over anomalous
  pixels plus the mean over normal pixels of -(1 - p_t)^2 log(p_t + 1e-8)) + Dice on the anomalous channel
  (1 - (2 sum(p g) + 1e-5) / (sum p + sum g + 1e-5) over the whole batch); plus 0.01 x the three flow KL terms
  (sum over the batch of log q(z_0) - log N(z_K; 0, I), minus the summed log|det|, divided by the batch size;
  for an image-agnostic distribution, which has one sample, loss.py's (batch, D) zero log-variance repeats the
  first sum's term once per image, not the log-det: (B (log q - log p) - log|det|) / B); plus the orthogonality
  loss (per state, the mean over images and prompt pairs of the squared cosine between different prompts of the
  bank, the diagonal counted as 0);
- test (test.py): R = 10 samples of each distribution; every (sample, prompt) pair gives a normal/anomalous
  text pair; image score = mean over the B x R pairs of softmax(image logits)[anomalous]; map = mean over the
  feature layers and the B x R pairs of the anomalous softmax of the upsampled logits; then per class:
  Gaussian sigma 8 on the maps (scipy, truncate 4, reflect), image score = 0.5 min-max(score) + 0.5 min-max(mean
  of the top-k values of the unsmoothed map) (k = 2000) for industrial sets, min-max(score) alone for the
  medical ones (the official image-only sets HeadCT, BrainMRI, Br35H).

Decisions and differences (the code is followed where it and the paper differ):
- training is the official stage 1 only, for the configured epochs. train.py validates after every epoch on
  five classes of the *target* dataset, keeps the best epoch, and switches to a stage 2 (the image CE alone
  through an extra image mapping and patch fusion head) when that validation stops improving; that selection
  uses test data of the evaluated domain, which our protocol forbids, so stage 2 and its modules (`fuse`,
  `image_mapping`) are left out. Likewise left out: the reconstruction decoders and `p_mu` (built, never in the
  loss: the authors' comment says they were discarded) and the EMA (models/EMA.py: only `save_check` /
  `load_check` of the best epoch are called, never a weight average, so nothing of it reaches the test).
- optimiser: Adam(0.5, 0.999) with the official per-group learning rates as multiples of TrainConfig.lr (1e-4):
  prompts x10, flow parameters (u, w, b, state vectors) x10, temperatures x100, everything else x1
  (`parameter_groups`). The official cosine schedule with 10 % warm-up is not available in the generic
  trainer (MultiStepLR with no milestones: a constant rate).
- training data: the official datasets.py augments every training image (albumentations: rotate +-30,
  RandomRotate90, brightness/contrast, Gauss noise, one of blur / colour jitter / Gaussian blur, each p 0.5)
  and, training on MVTec-AD, replaces an image by a 2x2 mosaic of four anomalous images of its class with
  p 0.4. The paper profile uses the project's training augmentation instead (SPEC 7: rotation +-30, shift,
  colour jitter, each p 0.5; `augment: true`); the other operations and the mosaic are left out.
- test-time samples are drawn from a generator seeded by `sample_seed` in the official order (context, normal,
  anomalous; R each), on the CPU, never from the global RNG. The same R noise vectors serve every image
  (common random numbers), so an image's numbers do not depend on its batch or position; the official code
  draws fresh context noise for every image and reuses the first image's state samples for the whole run.
  Per image the samples are distributed as in the official code.
- batches: the official test runs one image at a time (its text encoder fails for more); here any batch
  size gives each image its own samples. Samples with an unknown mask are left out of the segmentation terms.
- the image-specific and image-agnostic latents have the text width and the RCA / class-mapping sizes the
  embedding width; the official code sizes both by its embed_dim and text width, which are equal on every
  backbone it supports (ViT-B-16, ViT-L-14(-336)); the tiny demo ViT has width 64 and embedding 32.
- the official top-k is 20 instead of 2000 for seven small-object classes (capsules, macaroni1/2, pipe_fryum,
  screw, cashew, chewinggum); `protocol_scores` does not see the class, so one `topk` serves all classes.
- `predict` returns the unsmoothed maps (the image score needs them); the Gaussian is applied per image in
  `protocol_scores`. Its min-max is the project's `min_max` (the official adds 1e-8 to the range).
- the backbone's GELU is exact (their own CLIP uses nn.GELU on OpenAI weights: quick_gelu false), the position
  table is resized bicubically with antialias, as theirs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moeclip.config import BackboneConfig, Domain
from moeclip.methods.anomalyclip import gaussian_blur
from moeclip.methods.base import ZeroShotMethod, class_texts
from moeclip.methods.precision import float32
from moeclip.methods.prompts import CONTEXT_PLACEHOLDER
from moeclip.methods.scoring import min_max
from moeclip.methods.targets import Targets

# The official renaming of folder names in the prompts (models/VPB.py); every other name is used as it is.
CLASS_NAMES = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
               "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
               "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}
LOG_DET_EPS = 1e-5  # inside log(|1 + u.psi| + eps) of the planar flow
FOCAL_EPS = 1e-8
DICE_EPS = 1e-5


class BayesPFLConfig(BackboneConfig):
    """Everything that defines a Bayes-PFL network and its objective; every value comes from params.yaml."""

    feature_layers: tuple[int, ...] = Field(description="1-indexed vision blocks whose raw tokens feed the RCA "
                                                        "(6 12 18 24 of ViT-L-14-336)")
    prompt_num: int = Field(ge=1, description="B: prompts in the bank (3)")
    context_length: int = Field(ge=1, description="P: learned context vectors per prompt (5)")
    state_length: int = Field(ge=1, description="Q: learned state vectors per prompt and state (5)")
    num_flows: int = Field(ge=0, description="K: planar flows of each distribution (10)")
    test_samples: int = Field(ge=1, description="R: samples of each distribution at test time (10)")
    sample_seed: int = Field(description="seed of the test-time samples (the official --seed: 333)")
    rca_heads: int = Field(ge=1, description="heads of the residual cross-modal attention (4)")
    initial_temperature: float = Field(gt=0, description="both learned temperatures start at log(1 / this) (0.07)")
    kl_weight: float = Field(ge=0, description="weight of each flow KL term (0.01)")
    orthogonal_weight: float = Field(ge=0, description="weight of the prompt-bank orthogonality loss (1)")
    focal_gamma: float = Field(description="gamma of the class-balanced focal loss (2)")
    sigma: float = Field(gt=0, description="Gaussian on the full-size test map, in pixels (8 at 518 px)")
    score_alpha: float = Field(ge=0, le=1, description="weight of the text score in the industrial image "
                                                       "score; 1 - alpha weights the map's top-k mean (0.5)")
    topk: int = Field(ge=1, description="top-k pixels of the unsmoothed map in the image score (2000 at 518 px)")
    lr_scale_prompts: float = Field(gt=0, description="learning rate of the prompt bank / TrainConfig.lr (10)")
    lr_scale_flows: float = Field(gt=0, description="learning rate of flow u, w, b and state vectors / lr (10)")
    lr_scale_temperatures: float = Field(gt=0, description="learning rate of the two temperatures / lr (100)")

    @model_validator(mode="after")
    def _consistent(self) -> BayesPFLConfig:
        if not self.feature_layers or min(self.feature_layers) < 1:
            raise ValueError("feature_layers must name at least one 1-indexed vision block")
        return self


class GaussianEncoder(nn.Module):
    """Mean and variance MLPs (Linear-Softplus-Linear-Softplus-Linear each); the variance is exp(h / 2)."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.mean, self.log_variance = (nn.Sequential(nn.Linear(inputs, hidden), nn.Softplus(),
                                                      nn.Linear(hidden, hidden), nn.Softplus(),
                                                      nn.Linear(hidden, outputs)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x), torch.exp(0.5 * self.log_variance(x))


@dataclass
class FlowSample:
    """Samples of one distribution: z_0 and z_K (..., D), the summed log|det| (...), the Gaussian's mean and
    variance (broadcastable to z_0)."""

    z0: torch.Tensor
    zk: torch.Tensor
    log_det: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor

    def kl(self, batch: int) -> torch.Tensor:
        """(sum over the batch of log q(z_0) - log N(z_K; 0, I), minus the summed log|det|) / batch (loss.py; the
        2 pi terms cancel). A state's one sample counts once per image in the first sum (loss.py's zero log-
        variance of shape (batch, D) broadcasts it) but once in the log-det sum."""
        log_q = (-0.5 * (self.variance.log() + (self.z0 - self.mean) ** 2 / self.variance)).sum(dim=-1)
        log_p = (-0.5 * self.zk ** 2).sum(dim=-1)
        return ((log_q - log_p).expand(*log_q.shape[:-1], batch).sum() - self.log_det.sum()) / batch


def planar_flows(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K planar flows z <- z + u_k tanh(w_k.z + b_k) on z (S, N, D) with u, w (N, K, D) and b (N, K), N the rows
    (images, or 1 for a state); returns z_K and the summed log(|1 + u_k.w_k tanh'| + 1e-5) (S, N)."""
    log_det = z.new_zeros(z.shape[:-1])
    for k in range(u.shape[1]):
        activation = torch.tanh((w[:, k] * z).sum(dim=-1, keepdim=True) + b[:, k, None])
        slope = (1 - activation ** 2) * (w[:, k] * u[:, k]).sum(dim=-1, keepdim=True)
        z = z + u[:, k] * activation
        log_det = log_det + torch.log(torch.abs(1 + slope) + LOG_DET_EPS).squeeze(-1)
    return z, log_det


def draw(mean: torch.Tensor, variance: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Reparameterised samples mean + sqrt(variance) * noise: (N, D) Gaussian, (S, 1 or N, D) noise -> (S, N, D)."""
    return mean + variance.sqrt() * noise


class ImageSpecificFlow(nn.Module):
    """The image-specific distribution: Gaussian of the global embedding, flows amortised by linear maps of it."""

    def __init__(self, embed: int, hidden: int, latent: int, flows: int) -> None:
        super().__init__()
        self.flows, self.latent = flows, latent
        self.encoder = GaussianEncoder(embed, hidden, latent)
        self.u, self.w = nn.Linear(embed, flows * latent), nn.Linear(embed, flows * latent)
        self.b = nn.Linear(embed, flows)

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> FlowSample:
        """image (N, E), noise (S, N or 1, D) -> samples (S, N, D)."""
        mean, variance = self.encoder(image)
        shape = (image.shape[0], self.flows, self.latent)
        z0 = draw(mean, variance, noise)
        zk, log_det = planar_flows(z0, self.u(image).view(shape), self.w(image).view(shape), self.b(image))
        return FlowSample(z0, zk, log_det, mean, variance)


class StateFlow(nn.Module):
    """An image-agnostic distribution: the shared Gaussian encoder of a learned state vector, learned flows; all
    four tensors N(0, 1) as the official nn.Parameter(torch.randn(...))."""

    def __init__(self, embed: int, latent: int, flows: int) -> None:
        super().__init__()
        self.state = nn.Parameter(torch.randn(1, embed))
        self.u, self.w = nn.Parameter(torch.randn(1, flows, latent)), nn.Parameter(torch.randn(1, flows, latent))
        self.b = nn.Parameter(torch.randn(1, flows))

    def forward(self, encoder: GaussianEncoder, noise: torch.Tensor) -> FlowSample:
        """noise (S, 1, D) -> samples (S, 1, D)."""
        mean, variance = encoder(self.state)
        z0 = draw(mean, variance, noise)
        zk, log_det = planar_flows(z0, self.u, self.w, self.b)
        return FlowSample(z0, zk, log_det, mean, variance)


class ResidualCrossAttention(nn.Module):
    """RCA: text embeddings attend to one layer's projected, normalised patch tokens and keep a residual."""

    def __init__(self, vision_width: int, embed: int, heads: int, layers: int) -> None:
        super().__init__()
        if embed % heads:
            raise ValueError(f"rca_heads {heads} must divide the embedding width {embed}")
        self.heads = heads
        self.query = nn.Linear(embed, embed)  # the official 1x1 Conv1d; PyTorch initialises both alike
        self.projections = nn.ModuleList(nn.Linear(vision_width, embed, bias=False) for _ in range(layers))

    def forward(self, text: torch.Tensor, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """text (N, T, D) unit, tokens (N, L, W) raw -> (updated unit text (N, T, D), unit patches (N, L, D))."""
        patches = F.normalize(self.projections[layer](tokens), dim=-1)
        query = self.query(text).unflatten(-1, (self.heads, -1))
        keys = patches.unflatten(-1, (self.heads, -1))
        weights = (torch.einsum("ntkc,nlkc->nktl", query, keys) * text.shape[-1] ** -0.5).softmax(dim=-1)
        attended = torch.einsum("nktl,nlkc->ntkc", weights, keys).flatten(2)
        return F.normalize(attended + text, dim=-1), patches


class PromptBank(nn.Module):
    """The learned vectors: context (B, P, W) ~ N(0, 0.02), normal / anomalous states (B, Q, W) ~ N(+-0.5, 0.02)
    (truncated normals, as the official init)."""

    def __init__(self, prompts: int, context: int, state: int, width: int) -> None:
        super().__init__()
        self.context = nn.Parameter(nn.init.trunc_normal_(torch.empty(prompts, context, width), std=0.02))
        self.normal = nn.Parameter(nn.init.trunc_normal_(torch.empty(prompts, state, width), mean=0.5, std=0.02))
        self.anomalous = nn.Parameter(nn.init.trunc_normal_(torch.empty(prompts, state, width), mean=-0.5,
                                                            std=0.02))


@dataclass
class VisionFeatures:
    """g = ln_post(CLS) @ proj (N, E) and the raw patch tokens of the feature layers (layers, N, L, W)."""

    global_embedding: torch.Tensor
    tokens: torch.Tensor


@dataclass
class Samples:
    """One forward's samples: image-specific (S, N, D) and normal / anomalous state (S, 1, D) distributions."""

    context: FlowSample
    normal: FlowSample
    anomalous: FlowSample


@dataclass
class BayesPFLOutputs:
    """A training step's: the selected pair's image logits (N, 2) and upsampled probabilities (N, layers, 2, H, W),
    the unit text embeddings of the bank (N, B, 2, D) and the flow samples."""

    image_logits: torch.Tensor
    probabilities: torch.Tensor
    text: torch.Tensor
    samples: Samples


class BayesPFL(ZeroShotMethod):
    """Bayes-PFL's stage 1 network on a frozen open_clip ViT (module docstring)."""

    name = "bayes_pfl"
    config_class = BayesPFLConfig

    def __init__(self, config: BayesPFLConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        self.check_layers(config.feature_layers)
        self.tokenizer = tokenizer
        vision_width = clip.visual.conv1.out_channels
        text_width = clip.ln_final.normalized_shape[0]
        embed = clip.text_projection.shape[1]
        self.prompts = PromptBank(config.prompt_num, config.context_length, config.state_length, text_width)
        self.context_flow = ImageSpecificFlow(embed, vision_width // 2, text_width, config.num_flows)
        self.state_encoder = GaussianEncoder(embed, vision_width // 2, text_width)
        self.normal_flow = StateFlow(embed, text_width, config.num_flows)
        self.anomalous_flow = StateFlow(embed, text_width, config.num_flows)
        self.rca = ResidualCrossAttention(vision_width, embed, config.rca_heads, len(config.feature_layers))
        self.class_mapping = nn.Linear(embed, embed)
        self.temperatures = nn.ParameterDict({kind: nn.Parameter(torch.tensor(math.log(1 / config.initial_temperature)))
                                              for kind in ("pixel", "image")})
        for module in self.added_modules().values():  # the official init of every Linear but the RCA query
            for linear in module.modules():
                if isinstance(linear, nn.Linear) and linear is not self.rca.query:
                    nn.init.normal_(linear.weight, std=0.02)
                    if linear.bias is not None:
                        nn.init.zeros_(linear.bias)

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The official Adam groups: prompt bank, flow parameters (amortised and learned u, w, b; state vectors),
        temperatures, everything else (encoders, RCA, class mapping) at the base rate."""
        flows = [*self.context_flow.u.parameters(), *self.context_flow.w.parameters(),
                 *self.context_flow.b.parameters(), *self.normal_flow.parameters(), *self.anomalous_flow.parameters()]
        grouped = {id(p) for p in [*flows, *self.prompts.parameters(), *self.temperatures.parameters()]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in grouped]
        config = self.config
        return [(list(self.prompts.parameters()), config.lr_scale_prompts),
                (list(self.temperatures.parameters()), config.lr_scale_temperatures),
                (flows, config.lr_scale_flows), (rest, 1.0)]

    # -- the method's protocol (moeclip/methods/base.py) -------------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        """The folder names (renamed in `class_tokens`)."""
        return class_texts(batch, "folder")

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed maps (B, H, W) and text scores (B,), each the mean over the feature layers (maps) and the
        R x B (sample, prompt) pairs of the anomalous softmax; `domain` is used by `protocol_scores` only."""
        vision = self.encode_image(images)
        samples = self.sample(vision.global_embedding, self.test_noise(images.device))
        with float32(images):
            text = self.text_embeddings(texts, samples).flatten(1, 2)  # (N, R*B, 2, D)
            scores = self.image_logits(text, vision.global_embedding).softmax(dim=-1)[..., 1].mean(dim=1)
            maps = torch.stack([self.map_logits(text, vision.tokens[i], i, images.shape[-1]).softmax(dim=2)[:, :, 1]
                                for i in range(len(self.config.feature_layers))], dim=1)
            return maps.mean(dim=(1, 2)), scores

    def protocol_scores(self, maps: torch.Tensor, scores: torch.Tensor,
                        domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class (metric_and_visualization.py): the Gaussian on each map; industrial image score alpha
        min-max(S) + (1 - alpha) min-max(mean of the top-k unsmoothed map values), medical min-max(S)."""
        maps, scores = maps.float(), scores.float()
        smoothed = gaussian_blur(maps, self.config.sigma)
        if domain == "medical":
            return smoothed, min_max(scores)
        peak = maps.flatten(1).topk(min(self.config.topk, maps[0].numel()), dim=1).values.mean(dim=1)
        return smoothed, self.config.score_alpha * min_max(scores) + (1 - self.config.score_alpha) * min_max(peak)

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> BayesPFLOutputs:
        """One sample of each distribution from the global RNG (context noise (N, D), then normal and anomalous
        (1, D)), then one prompt index from it (train.py's order)."""
        vision = self.encode_image(images)
        width = self.prompts.context.shape[-1]
        noise = [torch.randn(shape, device=images.device) for shape in ((1, len(images), width), (1, 1, width),
                                                                       (1, 1, width))]
        samples = self.sample(vision.global_embedding, noise)
        index = int(torch.randint(0, self.config.prompt_num, (1,)))
        with float32(images):
            text = self.text_embeddings(texts, samples)[:, 0]  # (N, B, 2, D)
            pair = text[:, index:index + 1]
            logits = self.image_logits(pair, vision.global_embedding)[:, 0]
            probabilities = torch.stack([self.map_logits(pair, vision.tokens[i], i, images.shape[-1])[:, 0]
                                         for i in range(len(self.config.feature_layers))], dim=1).softmax(dim=2)
            return BayesPFLOutputs(logits, probabilities, text, samples)

    def training_losses(self, outputs: BayesPFLOutputs, targets: Targets) -> dict[str, torch.Tensor]:
        """CE(pair logits) + sum over layers of (focal + Dice) + kl_weight x (three KL terms) + orthogonal_weight x
        orthogonality (train.py, loss.py), in float32."""
        config, batch = self.config, len(targets.labels)
        image = F.cross_entropy(outputs.image_logits.float(), targets.labels.long())
        known = targets.known.bool()
        probs, masks = outputs.probabilities.float()[known], (targets.masks[known] > 0.5).float()
        layers = probs.shape[1]
        focal = sum((balanced_focal_loss(probs[:, i], masks, config.focal_gamma) for i in range(layers)),
                    probs.new_zeros(()))
        dice = sum((batch_dice_loss(probs[:, i, 1], masks) for i in range(layers)), probs.new_zeros(()))
        samples = outputs.samples
        kl = sum(sample.kl(batch).float() for sample in (samples.context, samples.normal, samples.anomalous))
        orthogonal = orthogonality_loss(outputs.text.float())
        loss = image + focal + dice + config.kl_weight * kl + config.orthogonal_weight * orthogonal
        return {"loss": loss, "image_loss": image, "focal_loss": focal, "dice_loss": dice, "kl_loss": kl,
                "orthogonal_loss": orthogonal}

    # -- sampling -----------------------------------------------------------------------------
    def test_noise(self, device: torch.device) -> list[torch.Tensor]:
        """R standard normal vectors for each distribution (context, normal, anomalous), from a CPU generator
        seeded by `sample_seed`: the same for every image and every call."""
        generator = torch.Generator().manual_seed(self.config.sample_seed)
        width, count = self.prompts.context.shape[-1], self.config.test_samples
        return [torch.randn(count, 1, width, generator=generator).to(device) for _ in range(3)]

    def sample(self, image: torch.Tensor, noise: Sequence[torch.Tensor]) -> Samples:
        """Samples of the three distributions from (context, normal, anomalous) standard noise."""
        return Samples(self.context_flow(image.float(), noise[0]),
                       self.normal_flow(self.state_encoder, noise[1]),
                       self.anomalous_flow(self.state_encoder, noise[2]))

    # -- vision -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> VisionFeatures:
        """Every block (no autograd graph: nothing trainable); the feature layers' tokens without CLS."""
        visual = self.clip.visual
        with torch.no_grad():
            with float32(images):
                x = visual._embeds(images)
            taps = []
            for index, block in enumerate(visual.transformer.resblocks, start=1):
                x = block(x)
                if index in self.config.feature_layers:
                    taps.append(x[:, 1:])
            return VisionFeatures(visual.ln_post(x[:, 0]) @ visual.proj, torch.stack(taps))

    def image_logits(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """exp(tau_image) <normalise(mapped t), normalise(g)>: (N, T, 2, D), (N, E) -> (N, T, 2)."""
        mapped = F.normalize(self.class_mapping(text), dim=-1)
        unit = F.normalize(image.float(), dim=-1)[:, None, :, None]
        return self.temperatures["image"].exp() * (mapped @ unit)[..., 0]

    def map_logits(self, text: torch.Tensor, tokens: torch.Tensor, layer: int, size: int) -> torch.Tensor:
        """One layer's logits exp(tau_pixel) F_s t'^T, upsampled bilinearly (align_corners True):
        (N, T, 2, D) text, (N, L, W) tokens -> (N, T, 2, H, W)."""
        updated, patches = self.rca(text.flatten(1, 2), tokens.float(), layer)
        logits = self.temperatures["pixel"].exp() * patches @ updated.transpose(1, 2)  # (N, L, T*2)
        grid = tuple(self.clip.visual.grid_size)
        upsampled = F.interpolate(logits.transpose(1, 2).unflatten(-1, grid), size=(size, size), mode="bilinear",
                                  align_corners=True)
        return upsampled.unflatten(1, text.shape[1:3])

    # -- text ---------------------------------------------------------------------------------
    def class_tokens(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Tokens of "X <name>" per image, the name renamed as the official prompts do and lower-cased."""
        names = [CLASS_NAMES.get(text, text).lower() for text in texts]
        return self.tokenizer([f"{CONTEXT_PLACEHOLDER} {name}" for name in names]).to(device)

    def text_embeddings(self, texts: Sequence[str], samples: Samples) -> torch.Tensor:
        """(N, S, B, 2, D) unit embeddings: per image n, sample s, prompt b and state, "[SOS] (context_b + z_s,n)
        (state_b + z_state_s) <name> [EOS]" through the text tower, the EOS row projected."""
        clip, bank = self.clip, self.prompts
        tokens = self.class_tokens(texts, bank.context.device)  # (N, 77)
        context = bank.context + samples.context.zk.transpose(0, 1)[:, :, None, None]  # (N, S, B, P, W)
        states = torch.stack([bank.normal + samples.normal.zk[:, 0, None, None],
                              bank.anomalous + samples.anomalous.zk[:, 0, None, None]], dim=2)  # (S, B, 2, Q, W)
        learned = torch.cat([context[:, :, :, None].expand(-1, -1, -1, 2, -1, -1),
                             states.expand(len(tokens), *states.shape)], dim=-2)  # (N, S, B, 2, P+Q, W)
        length = learned.shape[-2]
        embedded = clip.token_embedding(tokens)[:, None, None, None].expand(*learned.shape[:4], -1, -1)
        x = torch.cat([embedded[..., :1, :], learned.to(embedded.dtype),
                       embedded[..., 2:embedded.shape[-2] - length + 1, :]], dim=-2)
        x = x.flatten(0, 3) + clip.positional_embedding
        for block in clip.transformer.resblocks:
            x = block(x, attn_mask=clip.attn_mask)
        eot = (tokens.argmax(dim=-1) + length - 1)[:, None, None, None].expand(learned.shape[:4]).flatten()
        out = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot] @ clip.text_projection
        return F.normalize(out, dim=-1).unflatten(0, learned.shape[:4])


def balanced_focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """loss.py's focal: -(1 - p_t)^gamma log(p_t + 1e-8), averaged over the anomalous pixels and over the normal
    pixels of the batch separately, the two means added (each count + 1e-8): (N, 2, H, W), (N, H, W)."""
    p_true = torch.where(mask > 0.5, probs[:, 1], probs[:, 0])
    terms = -(1 - p_true) ** gamma * torch.log(p_true + FOCAL_EPS)
    anomalous = mask > 0.5
    return ((terms * anomalous).sum() / (anomalous.sum() + FOCAL_EPS)
            + (terms * ~anomalous).sum() / ((~anomalous).sum() + FOCAL_EPS))


def batch_dice_loss(anomalous: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """loss.py's Dice on the anomalous channel, sums over the whole batch: 1 - (2 sum(p g) + eps) / (sum p + sum g
    + eps), eps = 1e-5."""
    return 1 - (2 * (anomalous * mask).sum() + DICE_EPS) / (anomalous.sum() + mask.sum() + DICE_EPS)


def orthogonality_loss(text: torch.Tensor) -> torch.Tensor:
    """loss.py's Orthogonal_Loss on (N, B, 2, D) unit embeddings: per state, the mean over images and (b, b') of
    the squared cosine, the diagonal set to 0; the two states added."""
    cosines = torch.einsum("nbsd,ncsd->nsbc", text, text) ** 2
    off_diagonal = 1 - torch.eye(text.shape[1], device=text.device)
    return (cosines * off_diagonal).mean(dim=(0, 2, 3)).sum()
