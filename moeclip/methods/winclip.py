"""WinCLIP (Jeong et al., CVPR 2023), zero-shot: a frozen CLIP run on sliding windows of its own patch tokens.

The algorithm is anomalib's (the reference, ../shared/BASELINES.md section 1b), on open_clip 3.3.0:
1. Z = [cls ; patches] + position embedding, the tokens before ln_pre;
2. f = the ordinary CLIP image embedding; S = s(f) is the image score;
3. for each window size k, every k x k block of the patch grid at stride 1 (row-major): the short sequence
   [Z_cls, Z of its k^2 patches] through ln_pre, all blocks, ln_post, CLS, proj -> g_w;
4. s(v) = softmax([cos(v, t_n), cos(v, t_a)] / tau)[1], with t_n / t_a the means of the unnormalised
   text embeddings of the 147 normal / 84 anomalous prompts;
5. per k and patch p, M_k(p) = harmonic mean of s(g_w) over the windows w covering p;
6. M = harmonic mean of (S broadcast, if configured) and every M_k, upsampled bilinearly to the input.
Nothing is trained; the window index tensors are non-persistent buffers, so a checkpoint holds no weights.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moeclip.config import BackboneConfig, Domain
from moeclip.methods.base import ClassText, ZeroShotMethod, class_texts
from moeclip.methods.prompts import (
    NORMAL_STATES,
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_TEMPLATES,
    ensemble,
)
from moeclip.methods.precision import float32


class WinCLIPConfig(BackboneConfig):
    """The `model` section of a WinCLIP profile (no defaults: every value comes from params.yaml)."""

    class_text: ClassText = Field(description="folder: raw folder names as the official runs; description")
    window_sizes: tuple[int, ...] = Field(description="k of the k x k patch windows (anomalib: 2, 3)")
    include_image_scale: bool = Field(description="the image score S joins the harmonic fusion (anomalib: true)")
    temperature: float = Field(gt=0, description="tau of the two-way softmax (anomalib: 0.07)")

    @model_validator(mode="after")
    def _scales(self) -> WinCLIPConfig:
        if any(k < 1 for k in self.window_sizes) or len(set(self.window_sizes)) != len(self.window_sizes):
            raise ValueError(f"window_sizes must be distinct positive integers, got {self.window_sizes}")
        if not self.window_sizes and not self.include_image_scale:
            raise ValueError("the fusion needs at least one scale: a window size or include_image_scale")
        return self


def winclip_prompts(text: str) -> tuple[list[str], list[str]]:
    """The normal (7 states x 21 templates) and anomalous (4 x 21) prompts around one class text."""
    return (ensemble(text, NORMAL_STATES, WINCLIP_TEMPLATES),
            ensemble(text, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES))


def window_index(grid: tuple[int, int], k: int) -> torch.Tensor:
    """(n_windows, k*k) flat patch indices of every k x k window at stride 1; windows and the patches inside
    each one in row-major order (the order the harmonic aggregation assumes)."""
    if k > min(grid):
        raise ValueError(f"window size {k} exceeds the {grid[0]}x{grid[1]} patch grid")
    flat = torch.arange(grid[0] * grid[1]).reshape(grid)
    return flat.unfold(0, k, 1).unfold(1, k, 1).reshape(-1, k * k)


def window_cover(index: torch.Tensor, patches: int) -> torch.Tensor:
    """(n_windows, patches) 0/1 float: which patches each window covers (the harmonic mean as one matmul)."""
    return torch.zeros(index.shape[0], patches).scatter_(1, index, 1.0)


def anomaly_probability(embeddings: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """s(v): softmax over [cos(v, t_n), cos(v, t_a)] / tau, anomalous entry. embeddings (B, ..., D), anchors
    (B, 2, D) -> (B, ...)."""
    v = F.normalize(embeddings.float(), dim=-1).reshape(embeddings.shape[0], -1, embeddings.shape[-1])
    cosines = v @ F.normalize(anchors.float(), dim=-1).transpose(1, 2)
    return (cosines / temperature).softmax(dim=-1)[..., 1].reshape(embeddings.shape[:-1])


def harmonic_fusion(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """n / sum(1 / x_i): the harmonic mean, which a single low (normal) scale pulls down."""
    return len(terms) / sum(1 / term for term in terms)


class WinCLIP(ZeroShotMethod):
    """Training-free WinCLIP zero-shot anomaly maps and image scores (see the module docstring)."""

    name = "winclip"
    config_class = WinCLIPConfig
    needs_training = False

    def __init__(self, config: WinCLIPConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__(config, clip)
        visual = clip.visual
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError(f"{config.backbone}: WinCLIP needs a ViT pooled by its class token")
        self.tokenizer = tokenizer
        self.grid = tuple(visual.grid_size)
        patches = self.grid[0] * self.grid[1]
        for k in config.window_sizes:
            index = window_index(self.grid, k)
            self.register_buffer(f"window_index_{k}", index, persistent=False)
            self.register_buffer(f"window_cover_{k}", window_cover(index, patches), persistent=False)
        self._anchors: dict[str, torch.Tensor] = {}  # class text -> (2, D); the text tower is frozen

    # -- the method's protocol (moeclip/methods/base.py) -------------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        return class_texts(batch, self.config.class_text)

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps (B, H, W) at the input size and image scores S (B,); `domain` changes nothing."""
        del domain
        anchors = self.anchors_per_sample(texts).to(images.device)
        image_embedding, window_embeddings = self.encode_image(images)
        with float32(images):
            score = anomaly_probability(image_embedding, anchors, self.config.temperature)
            terms = [score[:, None, None].expand(-1, *self.grid)] if self.config.include_image_scale else []
            terms += [self.scale_map(anomaly_probability(g, anchors, self.config.temperature), k)
                      for k, g in window_embeddings.items()]
            grid_map = harmonic_fusion(terms)
            maps = F.interpolate(grid_map[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return maps[:, 0], score

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def text_anchors(self, text: str) -> torch.Tensor:
        """(2, D) [t_n, t_a]: means of the raw (unnormalised) prompt embeddings, computed once per class text."""
        if text not in self._anchors:
            device = next(self.clip.parameters()).device
            with float32(device):
                self._anchors[text] = torch.stack([
                    self.clip.encode_text(self.tokenizer(prompts).to(device)).float().mean(dim=0)
                    for prompts in winclip_prompts(text)])
        return self._anchors[text]

    def anchors_per_sample(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) anchors of a batch whose samples may belong to different classes."""
        return torch.stack([self.text_anchors(text) for text in texts])

    # -- vision -------------------------------------------------------------------------------
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Z (B, 1 + L, d): class and patch embeddings plus position embeddings, before ln_pre (float32, as the
        patch embedding is 0.1 % of the FLOPs and keeps the residual stream float32 under bf16 autocast)."""
        visual = self.clip.visual
        with float32(images):
            patches = visual.conv1(images).flatten(2).transpose(1, 2)
            cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
            return torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)

    def encode_sequences(self, z: torch.Tensor) -> torch.Tensor:
        """(N, T, d) token sequences -> (N, D): ln_pre, all blocks (batch-first), ln_post of CLS, proj."""
        visual = self.clip.visual
        x = visual.transformer(visual.ln_pre(z))
        return visual.ln_post(x[:, 0]) @ visual.proj

    def window_sequences(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """(B * n_windows, 1 + k^2, d): each window's [Z_cls, its patches], image-major; the tokens outside
        the window are dropped, not masked."""
        index = getattr(self, f"window_index_{k}")
        patches = z[:, 1:][:, index]  # (B, n, k^2, d)
        cls = z[:, :1, None].expand(-1, index.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=2).flatten(0, 1)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The global embedding f (B, D) and, per window size k, the window embeddings g (B, n_k, D); all
        windows of all images run as one batch per k."""
        z = self.tokens(images)
        windows = {k: self.encode_sequences(self.window_sequences(z, k)).unflatten(0, (z.shape[0], -1))
                   for k in self.config.window_sizes}
        return self.encode_sequences(z), windows

    def scale_map(self, window_scores: torch.Tensor, k: int) -> torch.Tensor:
        """M_k (B, H', W'): per patch, n_p / sum over the n_p windows covering it of 1 / s(g_w)."""
        cover = getattr(self, f"window_cover_{k}")
        return (cover.sum(dim=0) / ((1 / window_scores) @ cover)).unflatten(-1, self.grid)
