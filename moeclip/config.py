"""Model and training configuration: the `model` and `train` sections of params.yaml as validated objects.

A method's `model` section is its settings object: its network and its training objective (MoECLIP's
`ModelConfig`, the baselines' configs in moeclip/methods/). The `train` section is generic: any method is
trained by the same loop with those settings, so editing one method's settings leaves the others' alone.

Every switch used by the paper's ablations is a field here, so that later stages only wire
values from params.yaml into `ModelConfig` and never change model code; where the authors'
release differs, the release's behaviour is a named option. No field has a default: every
value lives once, in params.yaml (the paper's in `profiles.paper`, SPEC.md sections 1-7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Domain = Literal["industrial", "medical"]


class BlurConfig(BaseModel):
    """Gaussian blur applied to each test map on the patch grid (SPEC 6)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel_size: int = Field(ge=1)
    sigma: float = Field(gt=0)

    @model_validator(mode="after")
    def _odd_kernel(self) -> "BlurConfig":
        if self.kernel_size % 2 == 0:
            raise ValueError(f"blur kernel_size must be odd, got {self.kernel_size}")
        return self


@dataclass(frozen=True)
class MoESettings:
    """One MoE layer's hyperparameters (SPEC 2, Tables 9-11), built by `ModelConfig.moe` from the
    model section's flat fields."""

    num_experts: int
    top_k: int
    rank: int
    alpha: float
    dropout: float
    lambda_moe: float
    eps: float
    fofs: bool
    expert_type: str
    router_type: str
    router_hidden: int
    router_noise: float


class BackboneConfig(BaseModel):
    """How a method's frozen CLIP is loaded (moeclip/backbone.py) and computed: what every method's config has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(description="open_clip model name")
    image_size: int = Field(ge=16)
    weights: str | None = Field(
        description="an open_clip pretrained tag ('openai', 'laion400m_e31'), a local checkpoint path, or null for "
                    "random init")
    quick_gelu: bool = Field(description="QuickGELU activations (OpenAI CLIP was trained with them)")
    precision: Literal["fp32", "bf16"] = Field(
        description="fp32 as the papers and releases compute; bf16 = autocast of the frozen blocks' and the "
                    "added layers' matmuls (text, scores, maps and losses stay fp32)")


class ModelConfig(BackboneConfig):
    """Everything that defines a MoECLIP network and its training objective (MoECLIP's settings: no other
    method reads them); the backbone fields are SPEC 1's. How any method is optimised is `TrainConfig`'s."""

    # MoE adapter (SPEC 2); layers are 1-indexed transformer blocks
    moe_layers: tuple[int, ...]
    output_layers: tuple[int, ...] | None = Field(
        description="layers whose features feed the heads; null = moe_layers (Table 8 varies it)"
    )
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    lora_rank: int = Field(ge=1)
    lora_alpha: float
    lora_dropout: float = Field(ge=0, lt=1)
    lambda_moe: float = Field(ge=0, le=1)
    norm_eps: float
    fofs: bool = Field(description="frozen orthogonal A blocks (Eq. 6); false = trainable LoRA A")
    expert_type: Literal["lora", "full_rank"]
    router_type: Literal["linear", "mlp"]
    router_hidden: int = Field(ge=1, description="hidden width of the MLP router (Table 10)")
    router_noise: float = Field(
        ge=0, description="alpha of N(0,(alpha*sigma)^2) noise on router logits at inference (Table 11)"
    )

    # Patch average aggregation and heads (SPEC 4, 5)
    paa_scales: tuple[int, ...]
    image_adapter: bool = Field(description="depth-wise adapter for the image score (Eq. 13)")
    projection_activation: bool = Field(description="release's optional LeakyReLU after Proj_l")
    vanilla: bool = Field(description="plain frozen CLIP (Table 2 'Vanilla CLIP'): no MoE, CLIP's own projections")

    image_score: Literal["paper", "release"] = Field(
        description="paper (Eqs. 13-14): cosine of T_A with the mean of the raw adapter outputs; release: "
                    "dot product of T_A with the mean of the L2-normalised outputs (also used by L_ac)")

    # Text side (SPEC 5)
    text_head: Literal["release_adapter", "frozen_projection"]
    learnable_prompts: bool = Field(description="learnable context tokens instead of templates (Table 6)")
    prompt_context_length: int = Field(ge=1)
    use_class_descriptions: bool = Field(description="false = plain class names in prompts")
    description_set: Literal["datasets", "release"] = Field(
        description="datasets: the registry's descriptions (DATASETS.md); release: the authors' "
                    "release verbatim (its BTAD texts and its MVTec capsule typo)")
    logit_scale: float

    # Test-time post-processing (SPEC 6)
    blur_industrial: BlurConfig
    blur_medical: BlurConfig

    # Training objective (Eq. 16) and the release's training mode
    focal_gamma: float
    classification_loss: Literal["bce", "cross_entropy"] = Field(
        description="paper: BCE on S_A; release: 2-way cross-entropy on the raw cosines")
    lambda_etf: float = Field(ge=0)
    lambda_bal: float = Field(ge=0)
    expert_constraint: Literal["etf", "cosine", "contrastive"] = Field(
        description="output-stage expert constraint weighted by lambda_etf (Table 10 variants)")
    balance_unbiased: bool = Field(description="release: unbiased (n-1) variance in CV^2")
    release_compat: bool = Field(
        description="train as the release effectively does: eval mode (sparse top-k, no dropout), "
                    "no ETF and no balance loss")
    dice: Literal["paper", "release"] = Field(
        description="paper: 1 - 2 sum(yp) / (sum(y) + sum(p)); release: smoothing 1 in numerator and "
                    "denominator (a normal image's anomaly-channel Dice then has a gradient)")
    focal: Literal["paper", "release"] = Field(
        description="paper: -(1 - p_t)^gamma log p_t; release: its smoothing 1e-5 (one-hot target clamped to "
                    "[1e-5, 1 - 1e-5], 1e-5 added to p_t)")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if any(s < 1 or s % 2 == 0 for s in self.paa_scales) or not self.paa_scales:
            raise ValueError(f"paa_scales must be positive odd integers, got {self.paa_scales}")
        if any(layer < 1 for layer in self.moe_layers + tuple(self.output_layers or ())):
            raise ValueError("layers are 1-indexed transformer blocks")
        if not self.feature_layers:
            raise ValueError("at least one output layer is needed")
        if self.vanilla and (self.moe_layers or self.text_head != "frozen_projection" or self.learnable_prompts):
            raise ValueError("vanilla CLIP has no MoE layers, no learnable prompts and uses the frozen "
                             "text projection: set moe_layers: [], output_layers, text_head: frozen_projection")
        return self

    @property
    def moe(self) -> MoESettings:
        """The settings of each MoE layer, from this section's flat fields."""
        return MoESettings(num_experts=self.num_experts, top_k=self.top_k, rank=self.lora_rank, alpha=self.lora_alpha,
                           dropout=self.lora_dropout, lambda_moe=self.lambda_moe, eps=self.norm_eps, fofs=self.fofs,
                           expert_type=self.expert_type, router_type=self.router_type,
                           router_hidden=self.router_hidden, router_noise=self.router_noise)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Sorted layers whose (MoE-adapted) tokens feed the segmentation heads."""
        return tuple(sorted(self.output_layers if self.output_layers is not None else self.moe_layers))

    def blur_for(self, domain: Domain) -> BlurConfig:
        return self.blur_industrial if domain == "industrial" else self.blur_medical


class TrainConfig(BaseModel):
    """The `train` section of params.yaml (SPEC 7): how a method is optimised, whatever the method (optimiser,
    schedule, epochs, batch size, seed, data loading, checkpoints). A method's losses are its own config's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, description="paper 5e-4; the release's default is 5e-5")
    betas: tuple[float, float]
    weight_decay: float = Field(ge=0, description="AdamW's decoupled weight decay (AdaCLIP's 0.01); 0 = Adam "
                                                  "without decay, as MoECLIP and the other methods train")
    milestones: tuple[int, ...] = Field(description="MultiStepLR milestones, in iterations")
    gamma: float
    seed: int
    augment: bool
    num_workers: int | None = Field(
        ge=0, description="data-loading processes; null = one per spare core on CUDA, none on the CPU")
    checkpoint_every: int = Field(ge=1, description="iterations between resumable checkpoints")
    max_steps: int | None = Field(ge=1, description="end the training after this many optimiser steps "
                                                    "(null: train all epochs); a smoke run's bound")
