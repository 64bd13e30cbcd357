"""What every zero-shot method implements, so that one trainer, evaluator and checkpoint format serve them all.

A method is a frozen CLIP (`self.clip`) plus the modules it adds. The benchmark only ever calls:
  - `inputs(frame, ...)`: the manifest's images at the method's input size, CLIP-normalised;
  - `prompt_texts(batch)`: the text each sample's prompts are built around (a class name or description);
  - `predict(images, texts, domain)`: raw test-time maps (B, H, W) at input size and image scores (B,),
    including the method's own smoothing but no per-class normalisation;
  - `protocol_scores(maps, scores, domain)`: that per-class normalisation and the final image score, over
    all test images of one class (evaluation only);
  - `training_outputs(images, texts)` then `training_losses(outputs, targets)`: the forward of one
    training step (run inside the method's execution context) and its losses in float32 (outside it), the
    losses as the method's own config says; a training-free method has `needs_training = False` and raises
    if asked;
  - `trains_in_train_mode()`: whether a training step runs the added modules in train mode;
  - `training_stages(config, train_config)` and `begin_stage(index)`: a training in stages (AA-CLIP: text
    adapters first, image adapters second), each updating some added modules with its own optimiser settings; one
    stage (every trainable parameter, the train config) by default. A class method, so that the planner counts a
    training's epochs without building it.
Checkpoints keep `trainable_state_dict()` (the added modules) and the config; the backbone is rebuilt.
A method's config is a `BackboneConfig` (moeclip/config.py): how its CLIP is loaded and computed, plus
its own fields, its loss settings among them (the generic `TrainConfig` only says how it is optimised);
every value comes from params.yaml.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from torch import nn

from moeclip.backbone import load_clip, tokenizer_for
from moeclip.config import BackboneConfig, Domain, TrainConfig
from moeclip.data.dataset import ManifestDataset
from moeclip.methods.targets import Targets

ClassText = Literal["folder", "description"]


def class_texts(batch: Mapping[str, Sequence[str]], kind: ClassText) -> list[str]:
    """Each sample's class text: the raw folder name (`metal_nut`, as the official WinCLIP / April-GAN runs
    prompt) or the registry's description (DATASETS.md)."""
    return list(batch["class_name"] if kind == "folder" else batch["description"])


@dataclass(frozen=True)
class TrainingStage:
    """Consecutive epochs of a training that update only the trainable parameters of the added modules named in
    `modules` (None: all of them), with a fresh optimiser and schedule built from `config` (its epochs, batch
    size, lr, milestones)."""

    config: TrainConfig
    modules: tuple[str, ...] | None = None


class ZeroShotMethod(nn.Module):
    """Base of every method: the frozen backbone, the added modules, and the calls the benchmark makes."""

    name: ClassVar[str]
    config_class: ClassVar[type[BackboneConfig]]
    needs_training: ClassVar[bool] = True

    def __init__(self, config: BackboneConfig, clip: nn.Module) -> None:
        super().__init__()
        if not getattr(clip.visual.transformer, "batch_first", True):  # every method indexes tokens batch-first
            raise ValueError("open_clip transformer must be batch-first (open_clip >= 2.26.1)")
        self.config = config
        self.clip = clip.requires_grad_(False).eval()

    @classmethod
    def load_backbone(cls, config: BackboneConfig) -> nn.Module:
        """The frozen CLIP at the method's input size (open_clip resizes the position table bicubically)."""
        return load_clip(config.backbone, config.image_size, config.weights, config.quick_gelu)

    @classmethod
    def build(cls, config: BackboneConfig, seed: int | None = None) -> "ZeroShotMethod":
        """The method with its CLIP loaded as `config` says; `seed` fixes every random initialisation (a
        random-weight backbone, the added modules) without touching the caller's RNG state."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(config, cls.load_backbone(config), tokenizer_for(config.backbone))

    @classmethod
    def count_parameters(cls, config: BackboneConfig) -> dict[str, int]:
        """`parameter_counts` without building the weights: laid out on the meta device, nothing is allocated
        or initialised, so a ViT-L counts in a fraction of a second."""
        with torch.device("meta"):
            clip = load_clip(config.backbone, config.image_size, None, config.quick_gelu, device="meta")
            return cls(config, clip, tokenizer_for(config.backbone)).parameter_counts()

    def check_layers(self, layers: Iterable[int]) -> None:
        """One line naming the backbone when a configured (1-indexed) block does not exist, before any work."""
        depth = len(self.clip.visual.transformer.resblocks)
        if max(layers, default=0) > depth:
            raise ValueError(f"{self.config.backbone} has {depth} blocks; layers {sorted(layers)} do not fit")

    # -- modes, parameters, data ----------------------------------------------------------------
    def train(self, mode: bool = True) -> "ZeroShotMethod":
        super().train(mode)
        self.clip.eval()  # the frozen backbone never uses dropout or patch dropout
        return self

    def added_modules(self) -> dict[str, nn.Module]:
        """The modules the method adds to CLIP (what a checkpoint must hold)."""
        return {name: module for name, module in self.named_children() if name != "clip"}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the added modules only (the frozen backbone comes from its own weights)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def parameter_counts(self) -> dict[str, int]:
        backbone = sum(p.numel() for p in self.clip.parameters())
        added = sum(p.numel() for m in self.added_modules().values() for p in m.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": backbone + added, "trainable": trainable, "backbone": backbone, "added": added}

    def inputs(self, frame: pd.DataFrame, **options: Any) -> ManifestDataset:
        """A manifest's images (and masks) resized to the method's input size and CLIP-normalised;
        `options` (train, seed, ...) as `ManifestDataset` takes them."""
        return ManifestDataset(frame, self.config.image_size, **options)

    @contextlib.contextmanager
    def expert_dispatch(self, sparse: bool) -> Iterator[None]:
        """Inside this block a method with experts sends each token to its top-k experts only (`sparse`) or
        evaluates every expert (the dense reference; methods/execution.py). The others have none to switch."""
        yield

    # -- what each method defines ---------------------------------------------------------------
    def prompt_texts(self, batch: Mapping[str, Sequence[str]]) -> list[str]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor, texts: Sequence[str],
                domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def protocol_scores(self, maps: torch.Tensor, scores: torch.Tensor,
                        domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class, over its N test images: the maps and final image scores the metrics see. By default the
        raw maps and the method's own image score (the baselines' protocol: S alone, no fusion with the map)."""
        return maps.float(), scores.float()

    def training_outputs(self, images: torch.Tensor, texts: Sequence[str]) -> Any:
        raise NotImplementedError(f"{self.name} is training-free")

    def training_losses(self, outputs: Any, targets: Targets) -> dict[str, torch.Tensor]:
        """{"loss": the total to minimise, other named terms to log}, weighted as `self.config` says."""
        raise NotImplementedError(f"{self.name} is training-free")

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable parameters in optimiser groups, each with its multiplier of `TrainConfig.lr`: one group
        at 1x for every method whose authors train all added parameters at one rate."""
        return [([p for p in self.parameters() if p.requires_grad], 1.0)]

    def trains_in_train_mode(self) -> bool:
        """Whether a training step runs the added modules in train mode (dropout, a method's training-only
        paths). True for every method as published; a method whose reference implementation trains in eval mode
        (MoECLIP's release, `release_compat`) says so here, so that the generic trainer needs none of its
        settings."""
        return True

    @classmethod
    def training_stages(cls, config: BackboneConfig, train: TrainConfig) -> list[TrainingStage]:
        """The stages the generic trainer runs one after the other; by default one: every added module, `train`."""
        return [TrainingStage(train)]

    def begin_stage(self, index: int) -> None:
        """Called by the trainer before the steps of stage `index` (also when resuming into it); the default has
        one stage and nothing to switch."""
