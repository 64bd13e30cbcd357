"""Planning by simulation: how long a plan of units takes on N GPUs, known before any GPU is rented.

A plan is a sequence of `PlannedUnit`s: a name, whether the unit needs a GPU, its estimated seconds, and
the units that must finish before it starts. How the units are enumerated (one per training, one per
(trained model, dataset) evaluation, small CPU units such as fetch, prepare, gather and report) is the
caller's business; this module only schedules and costs them.

`simulate(units, gpus)` runs the plan as a Ray cluster runs tasks submitted in plan order, each GPU unit
taking one whole GPU (event-driven list scheduling):

- a unit is ready when every unit of its `after` has finished;
- a ready CPU unit starts at once: the cluster is assumed to have CPUs enough for all of them;
- whenever a GPU is free, the earliest-submitted ready GPU unit starts on it. No look-ahead and no
  pre-emption: a free GPU never idles while a GPU unit is ready, even if an earlier-submitted unit will be
  ready a moment later, and a long unit is not held back for a better packing. Units that become ready at
  the same instant (zero-second units included) compete in submission order.

`critical_path(units)` is the longest chain by seconds: no number of GPUs finishes sooner. The other lower
bound is the GPU-seconds divided by the GPUs; `format_table` prints both beside the simulated makespans.

How a unit's cost is estimated (`training_seconds`, `evaluation_seconds`): images pushed through the model
divided by a throughput measured for the paper's model, MoECLIP on ViT-L/14-336 at 518 px, on one H100.
The default throughputs are the authors' release (SPEC.md section 11: fp32, plain attention, random
weights): 11.8 training images/s at batch 2, 31 inference images/s. A measured throughput of this
project's fast path (`reports/performance.md`, benchmarks/) replaces them through `images_per_s`. Another
image size scales the time by its number of patch tokens, (size // 14)^2 for ViT-L/14 (37^2 = 1,369 at
518 px), relative to 518 px: the documented assumption of this model.

What the estimate leaves out, so read it as an order of magnitude, not a quote:
- Token scaling is linear, but attention is quadratic in the tokens (about a fifth of ViT-L's FLOPs at
  518 px): a larger image costs somewhat more than estimated, a smaller one less.
- One model for every unit: other backbones (Table 5's ViT-B variants) and the baselines (WinCLIP's
  ViT-B-16-plus at 240 px, trainings at batch 8) are costed as ViT-L/14 at their token count, which
  overestimates the smaller backbones; the per-image cost is taken as independent of the batch size.
- Evaluation throughput is the forward pass alone: decoding and resizing the images, the metrics (AUPRO
  included) and writing maps are not counted, so an evaluation's estimate is a lower bound. A training
  assumes its loader workers hide data loading and augmentation.
- Fixed costs are not counted: process start, loading the CLIP weights, text anchors, checkpoints, the
  calibration pass after a training (one inference pass over its images: add `evaluation_seconds` for
  them), Table 13's timed forwards. Units are assumed not to slow each other (shared disks, CPUs and
  network of a node), moving checkpoints and manifests between nodes to take no time, and Ray's own
  scheduling to cost nothing.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

# ViT-L/14 cuts an image into 14 x 14 pixel patches (the paper's backbone, SPEC.md section 1).
PATCH_SIZE = 14
# The image size at which the authors' release was measured (SPEC.md section 11): 37 x 37 patches.
REFERENCE_IMAGE_SIZE = 518
# SPEC.md section 11: the release's training step at batch 2 takes about 170 ms on one H100 (fp32, 518 px),
# 2 / 0.170 = 11.76 images/s, quoted as 11.8 by docs/performance.md (SPEC: "11-12 images/s").
RELEASE_TRAIN_IMAGES_PER_S = 11.8
# SPEC.md section 11: the release's inference runs 30-32 images/s at batch 8-32 on one H100 (fp32, 518 px),
# the forward pass alone.
RELEASE_EVAL_IMAGES_PER_S = 31.0


@dataclass(frozen=True)
class PlannedUnit:
    """One unit of a plan: `after` names the units that must finish before it starts."""

    name: str
    gpu: bool  # takes one whole GPU while it runs; a CPU unit takes none
    seconds: float  # estimated running time
    after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "after", tuple(self.after))  # a list would make the unit unhashable
        if not self.name:
            raise ValueError("a planned unit needs a name")
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"unit {self.name!r}: seconds must be finite and at least 0, got {self.seconds!r}")


@dataclass(frozen=True)
class Slot:
    """When a unit ran in a simulated schedule, and on which GPU (numbered from 0; None for a CPU unit)."""

    start_s: float
    end_s: float
    gpu: int | None


@dataclass(frozen=True)
class Schedule:
    """A simulated run of a plan on `gpus` GPUs."""

    gpus: int
    slots: Mapping[str, Slot]  # every unit, in plan order
    makespan_s: float  # when the last unit ends (the run starts at 0)
    gpu_hours: float  # GPU units' seconds / 3600: what the rented GPUs are busy for
    utilisation: float  # gpu_hours / (gpus * makespan), 0 for an empty plan

    @property
    def makespan_h(self) -> float:
        return self.makespan_s / 3600

    def start(self, name: str) -> float:
        return self.slots[name].start_s

    def end(self, name: str) -> float:
        return self.slots[name].end_s


def _waits(units: Sequence[PlannedUnit]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """{unit: the units it waits for, each once} and the units in an order where each comes after those it
    waits for; refuses twice-planned names, unknown names and cycles."""
    waits: dict[str, tuple[str, ...]] = {}
    for unit in units:
        if unit.name in waits:
            raise ValueError(f"unit {unit.name!r} is planned twice")
        waits[unit.name] = tuple(dict.fromkeys(unit.after))
    for name, before in waits.items():
        for other in before:
            if other not in waits:
                raise ValueError(f"unit {name!r} waits for {other!r}, which is not a planned unit")
    return waits, _topological(waits)


def _topological(waits: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The units in an order where each comes after those it waits for (plan order among the free ones)."""
    position = {name: index for index, name in enumerate(waits)}
    remaining = {name: len(before) for name, before in waits.items()}
    dependents: dict[str, list[str]] = {name: [] for name in waits}
    for name, before in waits.items():
        for other in before:
            dependents[other].append(name)
    free = [position[name] for name, count in remaining.items() if count == 0]
    heapq.heapify(free)
    names, order = list(waits), []
    while free:
        name = names[heapq.heappop(free)]
        order.append(name)
        for dependent in dependents[name]:
            remaining[dependent] -= 1
            if remaining[dependent] == 0:
                heapq.heappush(free, position[dependent])
    if len(order) < len(waits):
        raise ValueError(f"units wait for each other in a cycle: {_cycle(waits, set(waits) - set(order))}")
    return order


def _cycle(waits: Mapping[str, tuple[str, ...]], stuck: set[str]) -> str:
    """One cycle among `stuck` (units that never become ready), as 'a -> b -> a', each waiting for the next."""
    name, path = min(stuck, key=list(waits).index), []
    while name not in path:
        path.append(name)
        name = next(other for other in waits[name] if other in stuck)  # a stuck unit waits for a stuck one
    return " -> ".join(path[path.index(name):] + [name])


def simulate(units: Sequence[PlannedUnit], gpus: int) -> Schedule:
    """Run `units` (in submission order) on `gpus` GPUs as described in the module's docstring."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a whole number of at least 1, got {gpus!r}")
    units = list(units)
    waits, _ = _waits(units)
    index = {unit.name: position for position, unit in enumerate(units)}
    remaining = {name: len(before) for name, before in waits.items()}
    dependents: dict[str, list[int]] = {name: [] for name in waits}
    for name, before in waits.items():
        for other in before:
            dependents[other].append(index[name])

    now = 0.0
    slots: dict[str, Slot] = {}
    running: list[tuple[float, int]] = []  # (end, unit index)
    ready_gpu: list[int] = []  # unit indices: the earliest-submitted ready GPU unit first
    free_gpus = list(range(gpus))  # the lowest-numbered free GPU first

    def start(position: int, gpu: int | None) -> None:
        unit = units[position]
        slots[unit.name] = Slot(now, now + unit.seconds, gpu)
        heapq.heappush(running, (now + unit.seconds, position))

    def ready(position: int) -> None:
        if units[position].gpu:
            heapq.heappush(ready_gpu, position)
        else:
            start(position, None)

    for position, unit in enumerate(units):
        if not waits[unit.name]:
            ready(position)
    while True:
        # Everything that ends by now ends first, zero-second chains included, so the GPUs are handed out
        # once every unit ready at this instant is known.
        while running and running[0][0] <= now:
            _, position = heapq.heappop(running)
            name = units[position].name
            if slots[name].gpu is not None:
                heapq.heappush(free_gpus, slots[name].gpu)
            for dependent in dependents[name]:
                remaining[units[dependent].name] -= 1
                if remaining[units[dependent].name] == 0:
                    ready(dependent)
        while free_gpus and ready_gpu:
            start(heapq.heappop(ready_gpu), heapq.heappop(free_gpus))
        if not running:
            break
        now = running[0][0]

    ordered = {unit.name: slots[unit.name] for unit in units}
    makespan = max((slot.end_s for slot in ordered.values()), default=0.0)
    gpu_seconds = sum(unit.seconds for unit in units if unit.gpu)
    return Schedule(gpus=gpus, slots=MappingProxyType(ordered), makespan_s=makespan, gpu_hours=gpu_seconds / 3600,
                    utilisation=gpu_seconds / (gpus * makespan) if makespan > 0 else 0.0)


def critical_path(units: Sequence[PlannedUnit]) -> tuple[list[str], float]:
    """The longest chain of units by seconds, first unit first, and its length in seconds: a lower bound of
    the makespan on any number of GPUs. Among chains equally long in seconds, the one with more units (so
    zero-second units such as a final report stay on it), then the earliest-planned units."""
    units = list(units)
    waits, order = _waits(units)
    seconds = {unit.name: unit.seconds for unit in units}
    position = {unit.name: index for index, unit in enumerate(units)}
    longest: dict[str, tuple[float, int]] = {}  # (seconds, units) of the longest chain ending with the unit
    previous: dict[str, str | None] = {}
    for name in order:
        best = None
        for other in sorted(waits[name], key=position.__getitem__):
            if best is None or longest[other] > longest[best]:
                best = other
        previous[name] = best
        length, count = longest[best] if best is not None else (0.0, 0)
        longest[name] = (length + seconds[name], count + 1)
    if not longest:
        return [], 0.0
    last: str | None = max(longest, key=lambda name: (longest[name], -position[name]))
    length, chain = longest[last][0], []
    while last is not None:
        chain.append(last)
        last = previous[last]
    return chain[::-1], length


def patch_tokens(image_size: int, patch: int = PATCH_SIZE) -> int:
    """The patch tokens of a square image: (size // patch)^2, as a ViT's strided patch embedding cuts it."""
    if patch < 1 or image_size < patch:
        raise ValueError(f"image size {image_size} px holds no {patch} px patch")
    return (image_size // patch) ** 2


def _size_factor(image_size: int, patch: int) -> float:
    """A unit's time at `image_size` relative to the measured 518 px: the ratio of patch tokens."""
    return patch_tokens(image_size, patch) / patch_tokens(REFERENCE_IMAGE_SIZE, PATCH_SIZE)


def _count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number of at least 0, got {value!r}")
    return value


def _throughput(images_per_s: float) -> float:
    if not math.isfinite(images_per_s) or images_per_s <= 0:
        raise ValueError(f"images_per_s must be positive, got {images_per_s!r}")
    return images_per_s


def training_seconds(images: int, epochs: int, image_size: int, *,
                     images_per_s: float = RELEASE_TRAIN_IMAGES_PER_S, patch: int = PATCH_SIZE) -> float:
    """Estimated seconds of `epochs` epochs over `images` training images at `image_size` px.

    `images_per_s` is the training throughput at 518 px (default: the authors' release on one H100, batch 2);
    the time scales with the patch tokens of `image_size` (module docstring). Optimiser steps only: the
    calibration pass that follows a training is `evaluation_seconds` over the same images."""
    total = _count(images, "images") * _count(epochs, "epochs")
    return total / _throughput(images_per_s) * _size_factor(image_size, patch)


def evaluation_seconds(images: int, image_size: int, *,
                       images_per_s: float = RELEASE_EVAL_IMAGES_PER_S, patch: int = PATCH_SIZE) -> float:
    """Estimated seconds to score `images` test images at `image_size` px.

    `images_per_s` is the inference throughput at 518 px (default: the authors' release on one H100, fp32,
    forward only, so a lower bound of an evaluation); the time scales with the patch tokens of `image_size`."""
    return _count(images, "images") / _throughput(images_per_s) * _size_factor(image_size, patch)


def format_table(units: Sequence[PlannedUnit], gpu_counts: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> str:
    """A markdown table of the plan simulated on each GPU count (makespan, GPU-hours, utilisation, speed-up
    against one GPU), followed by the critical path: the makespan no number of GPUs goes below."""
    if not gpu_counts:
        raise ValueError("format_table needs at least one GPU count")
    units = list(units)
    one = simulate(units, 1).makespan_s
    lines = ["| GPUs | makespan (h) | GPU-hours | utilisation | speed-up vs 1 GPU |",
             "|---:|---:|---:|---:|---:|"]
    for gpus in gpu_counts:
        schedule = simulate(units, gpus)
        speedup = f"{one / schedule.makespan_s:.2f}x" if schedule.makespan_s > 0 else "-"
        lines.append(f"| {gpus} | {schedule.makespan_h:.2f} | {schedule.gpu_hours:.2f} | "
                     f"{schedule.utilisation:.0%} | {speedup} |")
    chain, length = critical_path(units)
    lines += ["", f"Critical path: {length / 3600:.2f} h over {len(chain)} units"
                  + (f" ({' -> '.join(chain)})" if chain else "")
                  + ", the least makespan on any number of GPUs."]
    return "\n".join(lines) + "\n"
