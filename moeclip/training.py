"""Training a method on an auxiliary dataset (MoECLIP: SPEC 7), resumable to the same result.

Everything random is a function of the seed: the model's initialisation, each epoch's
shuffle (seed, epoch), each item's augmentation (seed, epoch, index) and the dropout
stream (the global torch RNG, saved in every checkpoint). A run killed at any step and
resumed from its last checkpoint therefore ends with the same weights as an
uninterrupted run (on the CPU; GPU kernels may differ in the last bits).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pydantic import BaseModel

from moeclip.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from moeclip.config import TrainConfig
from moeclip.data.dataset import loader_options
from moeclip.methods.base import ZeroShotMethod
from moeclip.methods.targets import Targets
from moeclip.methods.registry import build_method
from moeclip.methods.execution import Execution, executing, model_execution

LossLogger = Callable[[int, Mapping[str, float]], None]


@dataclass
class TrainResult:
    """The checkpoint written, the steps taken and their losses, and the trained model still in memory (so that
    what follows a training, such as calibration, need not build it again)."""

    checkpoint: Path
    steps: int
    history: list[dict[str, float]]
    model: ZeroShotMethod


def compute_losses(model: ZeroShotMethod, batch: Mapping[str, Any], device: torch.device,
                   execution: Execution = Execution()) -> dict[str, torch.Tensor]:
    """The method's training losses for one batch (for MoECLIP Eq. 16), as its own config weights them.

    The forward runs as `execution` says; the losses are computed in float32 outside it,
    without a host synchronisation.
    """
    images = batch["image"].to(device, non_blocking=True)
    targets = Targets(masks=batch["mask"][:, 0].to(device, non_blocking=True),
                      labels=batch["label"].to(device, non_blocking=True),
                      known=torch.as_tensor(batch["has_mask"]).to(device, non_blocking=True))
    with executing(model, execution, device.type):
        outputs = model.training_outputs(images, model.prompt_texts(batch))
    return model.training_losses(outputs, targets)


def build_optimizer(model: ZeroShotMethod, config: TrainConfig,
                    device: torch.device) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.MultiStepLR]:
    """Adam over the trainable parameters, in the method's groups (`parameter_groups`: each its multiple of
    the configured lr), and the MultiStepLR schedule (SPEC 7); AdamW where the config has a weight decay.

    On CUDA the fused kernel updates all parameters in one launch.
    """
    groups = [{"params": params, "lr": config.lr * scale} for params, scale in model.parameter_groups() if params]
    if not groups:
        raise ValueError("this model configuration has nothing to train")
    fused = device.type == "cuda"
    optimizer = (torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                   fused=fused) if config.weight_decay
                 else torch.optim.Adam(groups, lr=config.lr, betas=config.betas, fused=fused))
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)


def train_step(model: ZeroShotMethod, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               batch: Mapping[str, Any], device: torch.device, execution: Execution) -> dict[str, float]:
    """One optimisation step; the losses come back as floats through a single host synchronisation."""
    model.train(model.trains_in_train_mode())  # MoECLIP's release trains in eval mode (sparse, no dropout)
    losses = compute_losses(model, batch, device, execution)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    scheduler.step()
    return dict(zip(losses, torch.stack([value.detach() for value in losses.values()]).tolist()))


def _epoch_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, size, batch_size)]


class Trainer:
    """Owns the model, optimiser, scheduler and progress of one training run, kept in `checkpoint`."""

    def __init__(self, model_config: BaseModel, train_config: TrainConfig, frame: pd.DataFrame, checkpoint: Path,
                 device: str | torch.device = "cpu") -> None:
        self.model_config, self.config = model_config, train_config
        self.device = torch.device(device)
        self.checkpoint = Path(checkpoint)
        torch.manual_seed(train_config.seed)
        self.model = build_method(model_config, seed=train_config.seed).to(self.device)
        self.dataset = self.model.inputs(frame, train=train_config.augment, seed=train_config.seed)
        self.stages = self.model.training_stages(model_config, train_config)
        self.epochs = sum(stage.config.epochs for stage in self.stages)
        self._trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self._enter_stage(0)
        self.execution = model_execution(model_config)
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "complete": False}
        self.history: list[dict[str, float]] = []

    # -- stages -----------------------------------------------------------------------------
    def _stage_of(self, epoch: int) -> int:
        """The stage that runs `epoch` (the last stage for the epoch count itself)."""
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.config.epochs
            if epoch < end:
                return index
        return len(self.stages) - 1

    def _enter_stage(self, index: int) -> None:
        """Only the stage's modules train (of what the method made trainable), under a fresh optimiser and schedule."""
        modules = self.stages[index].modules
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in self._trainable and (modules is None or name.split(".")[0] in modules))
        self.model.begin_stage(index)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.stages[index].config, self.device)
        self.stage = index

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.checkpoint, self.model, self.config.seed,
                        train_config=self.config.model_dump(mode="json"), optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), rng=rng, progress=dict(self.progress),
                        history=list(self.history))

    def resume(self) -> bool:
        """Continue from the checkpoint if present; refuse one written with another configuration."""
        if not self.checkpoint.exists():
            return False
        payload = read_checkpoint(self.checkpoint)
        if payload.get("model_config") != self.model_config.model_dump(mode="json") or \
                payload.get("train_config") != self.config.model_dump(mode="json"):
            raise CheckpointError(f"checkpoint '{self.checkpoint}' was written with another configuration; "
                                  f"remove it or train into another folder")
        self.model.load_state_dict(payload["weights"], strict=False)
        progress = payload["progress"]
        # the optimiser state belongs to the stage of the last epoch that took a step
        finished_epoch = progress["step_in_epoch"] == 0 and progress["epoch"] > 0
        self._enter_stage(self._stage_of(progress["epoch"] - finished_epoch))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"]["cpu"])
        if "cuda" in payload["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(payload["rng"]["cuda"], self.device)
        self.progress, self.history = payload["progress"], payload["history"]
        return True

    # -- the loop ---------------------------------------------------------------------------
    def _loader(self, batches: list[list[int]], epoch: int = 0) -> DataLoader:
        # An own generator: creating the iterator would otherwise draw from the global RNG,
        # which a resumed run restores, and so shift the dropout stream.
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        return DataLoader(self.dataset, batch_sampler=batches, generator=generator,
                          **loader_options(self.device, self.config.num_workers))

    def _step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        return train_step(self.model, self.optimizer, self.scheduler, batch, self.device, self.execution)

    def _budget_spent(self) -> bool:
        """Whether `max_steps` of the configuration (a smoke run's bound) have been taken."""
        return self.config.max_steps is not None and self.progress["global_step"] >= self.config.max_steps

    def run(self, max_steps: int | None = None, log: LossLogger | None = None) -> TrainResult:
        """Train to the configured epochs or `max_steps`; this call's own `max_steps` pauses it (checkpointed)."""
        progress = self.progress
        while progress["epoch"] < self.epochs and not progress["complete"] and not self._budget_spent():
            if self._stage_of(progress["epoch"]) != self.stage:
                self._enter_stage(self._stage_of(progress["epoch"]))
            config = self.stages[self.stage].config
            per_epoch = math.ceil(len(self.dataset) / config.batch_size)
            self.dataset.set_epoch(progress["epoch"])
            batches = _epoch_batches(len(self.dataset), config.batch_size, self.config.seed, progress["epoch"])
            bar = tqdm(self._loader(batches[progress["step_in_epoch"]:], progress["epoch"]),
                       initial=progress["step_in_epoch"],
                       total=per_epoch, desc=f"epoch {progress['epoch'] + 1}/{self.epochs}", unit="batch")
            for batch in bar:
                losses = self._step(batch)
                progress["global_step"] += 1
                progress["step_in_epoch"] += 1
                self.history.append({"step": progress["global_step"], **losses})
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
                if log is not None:
                    log(progress["global_step"], losses)
                if max_steps is not None and progress["global_step"] >= max_steps:
                    self.save()
                    return TrainResult(self.checkpoint, progress["global_step"], self.history, self.model)
                if self._budget_spent():
                    break
                if progress["global_step"] % self.config.checkpoint_every == 0:
                    self.save()
            progress["epoch"] += 1
            progress["step_in_epoch"] = 0
            self.save()
        progress["complete"] = True
        self.save()
        return TrainResult(self.checkpoint, progress["global_step"], self.history, self.model)


def train(model_config: BaseModel, train_config: TrainConfig, frame: pd.DataFrame, checkpoint: Path,
          device: str | torch.device = "cpu", max_steps: int | None = None,
          log: LossLogger | None = None) -> TrainResult:
    """Train into `checkpoint` (resuming from it when it exists) and return the final checkpoint."""
    trainer = Trainer(model_config, train_config, frame, checkpoint, device)
    trainer.resume()
    return trainer.run(max_steps=max_steps, log=log)
