"""Text anchors T_N and T_A from prompt ensembles (SPEC 5, paper sec. 4.6 and B.4).

Two heads turn CLIP's end-of-text features into the joint space:
- `release_adapter` (default, the authors' release): a trainable bias-free linear
  + LeakyReLU on the EOT token after ln_final, replacing CLIP's text projection;
- `frozen_projection` (the paper's text): CLIP's own frozen text projection.
With fixed prompts the frozen text transformer's EOT features are computed once per
class description and cached; only the head runs at every step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moeclip.config import ModelConfig
from moeclip.methods.precision import float32
from moeclip.methods.prompts import CONTEXT_PLACEHOLDER

TEMPLATES = ("{}.", "a photo of {}.")
NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")

# Where the authors' release prompts with other text than the registry's descriptions (DATASETS.md):
# its long BTAD descriptions and the MVTec capsule typo it trained and tested with, verbatim.
RELEASE_DESCRIPTIONS: Mapping[tuple[str, str], str] = {
    ("mvtec", "capsule"): "black asd orange capsule",
    ("btad", "01"): "Bright concentric rings in neon yellow and blue tones against a dark blue background, "
                    "resembling a stylized wave or energy field radiating outward.",
    ("btad", "02"): "vertical fabric lines in warm, dusty pink and beige tones",
    ("btad", "03"): "oval concentric circular rings in gradient shades of blue and white",
}


def prompt_descriptions(batch: Mapping[str, Sequence[str]], config: ModelConfig) -> list[str]:
    """The '{}' of each sample's prompts: the plain class name, the registry's description, or the
    release's description (`use_class_descriptions`, `description_set`)."""
    if not config.use_class_descriptions:
        return list(batch["class_name"])
    if config.description_set == "release":
        return [RELEASE_DESCRIPTIONS.get((dataset, name), description) for dataset, name, description
                in zip(batch["dataset"], batch["class_name"], batch["description"])]
    return list(batch["description"])


def prompt_ensemble(description: str) -> tuple[list[str], list[str]]:
    """Every template x every state phrase, for the normal and the abnormal state."""
    def fill(states: Sequence[str]) -> list[str]:
        return [template.format(state.format(description)) for template in TEMPLATES for state in states]
    return fill(NORMAL_STATES), fill(ABNORMAL_STATES)


def learnable_prompt_texts(description: str, context_length: int) -> tuple[list[str], list[str]]:
    """Table 6 variant: [V_1..V_n][state][class]; the placeholders are replaced by learned vectors."""
    prefix = " ".join([CONTEXT_PLACEHOLDER] * context_length)
    def fill(states: Sequence[str]) -> list[str]:
        return [f"{prefix} {state.format(description)}." for state in states]
    return fill(NORMAL_STATES), fill(ABNORMAL_STATES)


class TextAnchors(nn.Module):
    """Computes [T_N, T_A] per class description from a frozen open_clip CLIP model."""

    def __init__(self, clip: nn.Module, tokenizer, head: str = "release_adapter", learnable_prompts: bool = False,
                 context_length: int = 4) -> None:
        super().__init__()
        self.clip = [clip]  # a list hides the frozen backbone from this module's parameters and state_dict
        self.tokenizer = tokenizer
        self.head_kind = head
        self.learnable = learnable_prompts
        self.context_length = context_length
        text_width = clip.ln_final.normalized_shape[0]
        embed_dim = clip.text_projection.shape[1]
        if head == "release_adapter":
            self.adapter = nn.Sequential(nn.Linear(text_width, embed_dim, bias=False), nn.LeakyReLU())
            nn.init.xavier_uniform_(self.adapter[0].weight)  # as the release (the paper has no adapter)
        elif head != "frozen_projection":
            raise ValueError(f"unknown text head '{head}' (release_adapter or frozen_projection)")
        if learnable_prompts:
            self.context_normal = nn.Parameter(torch.randn(context_length, text_width) * 0.02)
            self.context_abnormal = nn.Parameter(torch.randn(context_length, text_width) * 0.02)
        self._eot_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def _clip(self) -> nn.Module:
        return self.clip[0]

    def _encode(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Text transformer + ln_final, pooled at the EOT token: (P, text_width)."""
        clip = self._clip
        x = clip.token_embedding(tokens)
        if context is not None:
            x = torch.cat([x[:, :1], context.to(x.dtype).expand(x.shape[0], -1, -1),
                           x[:, 1 + self.context_length:]], dim=1)
        x = x + clip.positional_embedding.to(x.dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]

    def _project(self, eot: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "release_adapter":
            return self.adapter(eot)
        return eot @ self._clip.text_projection

    def _anchor(self, eot: torch.Tensor) -> torch.Tensor:
        """Normalise each prompt embedding, average the set, normalise again.

        In float32 even under bf16 autocast (a few prompts, negligible cost): a rounded anchor
        would shift every logit of its class in the same direction.
        """
        with float32(eot):
            return F.normalize(F.normalize(self._project(eot.float()), dim=-1).mean(dim=0), dim=-1)

    def _frozen_eot(self, description: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._eot_cache.get(description)
        if cached is None or cached[0].device != device:
            normal, abnormal = prompt_ensemble(description)
            # float32 even under autocast, so the cache is the same whichever execution mode filled it
            with torch.no_grad(), float32(device):
                cached = (self._encode(self.tokenizer(normal).to(device)),
                          self._encode(self.tokenizer(abnormal).to(device)))
            self._eot_cache[description] = cached
        return cached

    def _learnable_eot(self, description: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        normal, abnormal = learnable_prompt_texts(description, self.context_length)
        return (self._encode(self.tokenizer(normal).to(device), self.context_normal),
                self._encode(self.tokenizer(abnormal).to(device), self.context_abnormal))

    def forward(self, descriptions: Sequence[str]) -> torch.Tensor:
        """(C, 2, D) unit vectors [T_N, T_A] for each description."""
        device = self._clip.ln_final.weight.device
        eot_of = self._learnable_eot if self.learnable else self._frozen_eot
        anchors = []
        for description in descriptions:
            normal, abnormal = eot_of(description, device)
            anchors.append(torch.stack([self._anchor(normal), self._anchor(abnormal)]))
        return torch.stack(anchors)
