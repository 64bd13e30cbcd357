"""The pipeline's stages, each declared once: its arguments, what it reads and writes, its params, its code.

A stage is one module of this package with a `run(params, *arguments, profile_name)` function; its
code is everything that module imports (at its top, so a lazy import deeper down cannot escape the
list). The `stamps` stage, first of all, writes each stage call's stamp (runs/<profile>/stamps/<call>.json):
its code (those files and their digest) and its settings (the values of the params.yaml keys it
declares). Each call depends on its stamp alone, so DVC reruns exactly the calls whose code or settings
an edit changed, while dvc.lock holds one entry per call for both instead of every file and every
settings value of every call. Everything else derives from the declarations below:
  - dvc.yaml, rendered by `moeclip dvc-yaml` (moeclip/bench/dvcfile.py): deps, params, outs, metrics;
  - `moeclip stage <name> ...` (stages/cli.py);
  - the Prefect flow's tasks, their order (a call waits for the calls that write what it reads) and
    their cache keys (pipelines/).
Paths come from the profile's RunLayout; `fan_out` says which part of the plan a stage runs once for.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from moeclip.bench.experiments import Benchmark
    from moeclip.bench.layout import RunLayout

PACKAGE = "moeclip"
STAMP_STAGE = "stamps"
ALL_PARAMS = ""  # the params key that stands for the whole params file (the stamps stage's)
PARAMS_FILE = "params.yaml"
# Package data read by a module (not imported, so not seen in sys.modules): the module's code includes it.
PACKAGE_DATA = {"moeclip/backbone.py": ("moeclip/configs/MoECLIP-Tiny-ViT.json",),
                "moeclip/bench/reports/paper.py": ("moeclip/bench/reports/paper_results.yaml",
                                                   "moeclip/bench/reports/other_results.yaml")}
FanOut = Literal["datasets", "trainings", "evaluations", "methods", "experiments"]


@dataclass(frozen=True)
class Output:
    """A path a stage writes, with how DVC keeps it."""

    path: Path
    persist: bool = False  # kept when the stage re-runs (the stage itself decides what to redo)
    cache: bool = True     # false: kept in git or too small to cache
    metric: bool = False   # shown by `dvc metrics show`
    why: str = ""          # dvc.yaml's `desc` of the output


Reads = Callable[["RunLayout", "Benchmark", Mapping[str, str]], list[Path]]
Writes = Callable[["RunLayout", "Benchmark", Mapping[str, str]], list[Output]]


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    arguments: tuple[str, ...]
    fan_out: FanOut | None
    reads: Reads
    writes: Writes
    # The params.yaml keys the stage's outputs depend on, no more: each method's settings are its own, so
    # editing one method's settings invalidates only the stages that run it. {profile} and {<argument>} are
    # filled in. The stamps stage records their values in each call's stamp (an absent key as null).
    params: tuple[str, ...]

    @property
    def module(self) -> str:
        return f"{__name__}.{self.name}"

    def function(self) -> Callable[..., Path]:
        """The stage's `run` (imports the stage's module)."""
        return import_module(self.module).run

    def label(self, args: Mapping[str, str]) -> str:
        """The name of one call, as DVC names it: 'fetch@visa', 'evaluate-visa@mvtec', 'analysis'."""
        if self.fan_out == "evaluations":
            return f"{self.name}-{args['auxiliary']}@{args['target']}"
        return f"{self.name}@{args[self.arguments[0]]}" if self.arguments else self.name

    def inputs(self, layout: RunLayout, plan: Benchmark, args: Mapping[str, str]) -> list[Path]:
        """What one call reads: its declared reads and, but for the stamps stage, its stamp."""
        stamp = [] if self.name == STAMP_STAGE else [layout.stamp(self.label(args))]
        return self.reads(layout, plan, args) + stamp

    def paths(self, layout: RunLayout, plan: Benchmark, args: Mapping[str, str]) -> tuple[list[Path], list[Path]]:
        """(paths read, paths written) by one call."""
        return self.inputs(layout, plan, args), [output.path for output in self.writes(layout, plan, args)]

    def params_keys(self, profile: str, args: Mapping[str, str]) -> list[str]:
        return [key.format(profile=profile, **args) for key in self.params]


STAGES: tuple[Stage, ...] = (
    Stage(STAMP_STAGE, "Stamp each stage call with its code and settings (what the call depends on besides files).",
          (), None,
          reads=lambda layout, plan, a: [Path(PACKAGE), Path(PARAMS_FILE)],
          writes=lambda layout, plan, a: [Output(layout.stamps(), persist=True, cache=False,
                                                 why="a stamp whose code and settings did not change is not "
                                                     "rewritten, so nothing downstream sees an edit it is not in")],
          params=(ALL_PARAMS,)),
    Stage("fetch", "Download (or synthesise, for a synthetic profile) one dataset.", ("dataset",), "datasets",
          reads=lambda layout, plan, a: [],
          writes=lambda layout, plan, a: [Output(layout.raw(a["dataset"]), persist=True,
                                                 why="a re-run (e.g. after a data-section edit) must not delete a "
                                                     "dataset downloaded by hand; the stage checks what is there")],
          params=("profiles.{profile}.data",)),
    Stage("prepare", "Validate one dataset into its manifest.", ("dataset",), "datasets",
          reads=lambda layout, plan, a: [layout.raw(a["dataset"])],
          writes=lambda layout, plan, a: [Output(layout.manifest(a["dataset"]))],
          params=()),
    Stage("train", "Train the profile's model on one auxiliary dataset of the main plan.", ("auxiliary",),
          "trainings",
          reads=lambda layout, plan, a: [layout.manifest(a["auxiliary"])],
          writes=lambda layout, plan, a: [Output(layout.training(a["auxiliary"]), persist=True,
                                                 why="an interrupted training resumes from its checkpoint; a changed "
                                                     "configuration is trained afresh")],
          params=("profiles.{profile}.model", "profiles.{profile}.train", "profiles.{profile}.runtime")),
    Stage("evaluate", "Evaluate a main training zero-shot on one target dataset.", ("auxiliary", "target"),
          "evaluations",
          reads=lambda layout, plan, a: [layout.training(a["auxiliary"]), layout.manifest(a["target"])],
          writes=lambda layout, plan, a: [
              Output(layout.evaluation(a["auxiliary"], a["target"])),
              Output(layout.evaluation_metrics(a["auxiliary"], a["target"]), cache=False, metric=True)],
          params=("profiles.{profile}.runtime",)),
    Stage("baseline", "Train (where it needs training) and evaluate one Table 1 baseline on Table 1's protocol.",
          ("method",), "methods",
          reads=lambda layout, plan, a: [layout.manifests()],
          writes=lambda layout, plan, a: [
              Output(layout.baseline(a["method"]), persist=True,
                     why="trainings whose configuration did not change are kept"),
              Output(layout.baseline_resources(a["method"]), cache=False, why="parameter counts"),
              Output(layout.baseline_metrics(a["method"]), cache=False,
                     why="auxiliary x target x metrics: the report tabulates them in Table 1")],
          # A training-free method (WinCLIP) is built with the profile's training seed (bench/baselines.py).
          params=("main", "methods.{method}", "profiles.{profile}.methods.{method}", "profiles.{profile}.runtime",
                  "profiles.{profile}.train.seed")),
    Stage("experiment", "Run every variant of one experiment (a paper table or figure).", ("experiment",),
          "experiments",
          # Any main training and main result may be a variant's (the default rows reuse them).
          reads=lambda layout, plan, a: [layout.trainings(), layout.main_metrics(), layout.manifests()],
          writes=lambda layout, plan, a: [
              Output(layout.experiment(a["experiment"]), persist=True,
                     why="variants whose configuration did not change keep their training"),
              Output(layout.experiment_resources(a["experiment"]), cache=False, why="parameter counts, time, memory"),
              Output(layout.experiment_metrics(a["experiment"]), cache=False,
                     why="variants x datasets x metrics: too wide for `dvc metrics show`; the report tabulates them")],
          # MoECLIP's settings (its variants override them), the profile's selection of variants and how it
          # computes; `main` gives the default auxiliary dataset and the trainings a variant reuses. Not the
          # baselines' settings (`methods`), which the stage validates but never runs.
          params=("main", "experiments.{experiment}", "profiles.{profile}.model", "profiles.{profile}.train",
                  "profiles.{profile}.runtime", "profiles.{profile}.experiments")),
    Stage("analysis", "Expert utilisation, inter-expert similarity and routed-patch statistics of the main model.",
          (), None,
          reads=lambda layout, plan, a: [layout.training(plan.main.auxiliary), layout.manifests()],
          writes=lambda layout, plan, a: [Output(layout.analysis())],
          # `main`: the auxiliary dataset whose training is analysed and the targets its utilisation covers.
          params=("main", "profiles.{profile}.analysis", "profiles.{profile}.runtime")),
    Stage("report", "Render every table and figure from the stages' metric files.", (), None,
          reads=lambda layout, plan, a: [layout.metrics(), layout.resources(), layout.analysis()],
          writes=lambda layout, plan, a: [Output(layout.reports, cache=False,
                                                 why="small tables and figures, read on GitHub: kept in git")],
          # Besides the plan (main, the methods' labels, experiments) and the profile's selection of variants
          # (the rows), the banner and captions read the profile's model and train (a smoke run's backbone and
          # max_steps), data (synthetic or not) and analysis sections; not a baseline's settings.
          params=("main", "methods", "experiments", "profiles.{profile}.experiments", "profiles.{profile}.model",
                  "profiles.{profile}.train", "profiles.{profile}.data", "profiles.{profile}.analysis")),
)
BY_NAME = {stage.name: stage for stage in STAGES}


def plan_calls(plan: Benchmark) -> list[tuple[Stage, dict[str, str]]]:
    """Every call of the plan's pipeline as dvc.yaml expands it, the stamps stage's own aside."""
    calls = {"datasets": [{"dataset": dataset} for dataset in plan.datasets],
             "trainings": [{"auxiliary": auxiliary} for auxiliary in plan.main.targets],
             "evaluations": [{"auxiliary": auxiliary, "target": target}
                             for auxiliary, targets in plan.main.targets.items() for target in targets],
             "methods": [{"method": method} for method in plan.methods],
             "experiments": [{"experiment": experiment} for experiment in plan.experiments], None: [{}]}
    return [(stage, args) for stage in STAGES if stage.name != STAMP_STAGE for args in calls[stage.fan_out]]


def overlaps(written: list[Path], read: list[Path]) -> bool:
    """Whether a call writing `written` must run before one reading `read` (a path, or one inside the other)."""
    return any(w == r or r in w.parents or w in r.parents for w in written for r in read)


def waits_for(calls: list[tuple[str, dict[str, str]]], benchmark: Benchmark,
              layout: RunLayout) -> dict[str, list[str]]:
    """For each call (by its DVC name), the earlier calls that write what it reads: what DVC derives from
    dvc.yaml. Calls come in declaration order, so every writer precedes its readers."""
    written: dict[str, list[Path]] = {}
    waits: dict[str, list[str]] = {}
    for name, args in calls:
        stage = get_stage(name)
        reads, writes = stage.paths(layout, benchmark, args)
        label = stage.label(args)
        waits[label] = [other for other, paths in written.items() if overlaps(paths, reads)]
        written[label] = writes
    return waits


# The unit a single-unit call is, by its stage (the Prefect UI's task names); the others keep DVC's name.
UNIT_NAMES = {"fetch": "fetch/{dataset}", "prepare": "prepare/{dataset}", "train": "train/{auxiliary}",
              "evaluate": "evaluate/{auxiliary}/{target}"}


def unit_name(stage: Stage, args: Mapping[str, str]) -> str:
    """A single-unit call's task name: 'train/visa', 'evaluate/visa/mvtec', 'report'."""
    return UNIT_NAMES[stage.name].format(**args) if stage.name in UNIT_NAMES else stage.label(args)


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"no stage '{name}' (stages: {', '.join(BY_NAME)})")
    return BY_NAME[name]


# -- the code a stage ran ----------------------------------------------------------------------
_worker_code: set[str] = set()


def imported_code() -> list[str]:
    """The package files this process (and the worker processes it collected from) has loaded:
    imported modules and the package data they read, as paths relative to the package's folder."""
    files = set(_worker_code)
    if PACKAGE in sys.modules:
        root = Path(sys.modules[PACKAGE].__file__).resolve().parents[1]
        for name, module in list(sys.modules.items()):
            if (name == PACKAGE or name.startswith(PACKAGE + ".")) and getattr(module, "__file__", None):
                files.add(Path(module.__file__).resolve().relative_to(root).as_posix())
    return sorted(files | {data for file in files for data in PACKAGE_DATA.get(file, ())})


def add_worker_code(files: list[str]) -> None:
    """Count what a worker process of this stage loaded as the stage's code."""
    _worker_code.update(files)
