"""dvc.yaml, rendered from the stage declarations (moeclip/bench/stages/) and the params file's plan.

`moeclip dvc-yaml` writes it and `moeclip dvc-yaml --check` says whether the committed file is
current (a test runs the check). Paths carry `${profile}`, so `dvc repro` follows params.yaml's
`profile:` without a new rendering. A stage's code is the package files its module imports (`stages_code`;
a folder stands for its files where the stage imports every one of them); the `stamps` stage stamps each
call with its code and settings, and each call depends on its stamp. The
per-auxiliary evaluation stages and the plots follow params.yaml's main plan and report, so an edit
there may need a new rendering (the check says so).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from moeclip.bench.experiments import Benchmark
from moeclip.bench.layout import RunLayout
from moeclip.bench.reports.render import figure_files
from moeclip.bench.stages import ALL_PARAMS, STAGES, Output, Stage, get_stage

# The stage's entry (the launcher and `moeclip stage`) runs in every stage's process.
ENTRY_MODULES = ("moeclip.bench.launch", "moeclip.bench.stages.cli")
TEMPLATE_LAYOUT = RunLayout(data=Path("data/${profile}"), runs=Path("runs/${profile}"),
                            reports=Path("reports/${profile}"))
HEADER = """\
# The benchmark pipeline, rendered by `moeclip dvc-yaml` from the stage declarations in
# moeclip/bench/stages/ and params.yaml's plan: edit those, then render again (a test checks it).
# Paths carry the active profile (params.yaml `profile:`), so profiles keep separate data, runs
# and reports. Each call depends on its stamp, which the `stamps` stage writes from exactly the package
# files the call's stage imports and the params.yaml values it declares (so an edit reruns just the calls
# whose code or settings it changed; `dvc repro stamps && dvc status` names them).
#   fetch@<dataset> -> prepare@<dataset> -> train@<aux> -> evaluate-<aux>@<target> ----> report
#                                        -> baseline@<method> (trains, evaluates) ---/
#                                        -> experiment@<table/figure> --------------/
#                                        -> analysis -------------------------------/
"""
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the moeclip package
PARAMS_FILE = "params.yaml"


def stages_code(stages: Sequence[Stage]) -> dict[str, list[str]]:
    """Each stage's code: the package files (relative to PACKAGE_ROOT) that its process imports.

    One fresh interpreter imports every stage's module (torch, open_clip and MLflow once), drops the
    package's own modules and forks a child per stage that imports that stage's afresh, as the warm stage
    server does: a child loads what the stage's process loads, in a fraction of a second.
    """
    probe = f"from moeclip.bench.dvcfile import probe_stages; probe_stages({[stage.name for stage in stages]!r})"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PACKAGE_ROOT,
                          env={**os.environ, "MOECLIP_WARM": "0"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"importing the stages failed:\n{done.stderr[-3000:]}")
    return {name: folded(files, PACKAGE_ROOT) for name, files in json.loads(done.stdout).items()}


def probe_stages(names: list[str]) -> None:
    """In `stages_code`'s interpreter: print {stage: the package files its module imports} as JSON."""
    from moeclip.bench.warm import forget_package

    modules = {name: get_stage(name).module for name in names}
    for module in modules.values():  # every third-party module the stages need, imported once
        importlib.import_module(module)
    forget_package()
    found = {}
    for name, module in modules.items():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: import the stage as its own process would, report what was loaded
            os.close(read)
            for entry in (*ENTRY_MODULES, module):
                importlib.import_module(entry)
            with os.fdopen(write, "w") as out:
                json.dump(sys.modules["moeclip.bench.stages"].imported_code(), out)
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            text = answer.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"importing stage '{name}' failed")
        found[name] = json.loads(text)
    print(json.dumps(found))


def package_files(root: Path, folder: str) -> set[str]:
    """Every file under `folder` that DVC hashes for a folder dependency (bytecode caches are .dvcignored)."""
    return {path.relative_to(root).as_posix() for path in (root / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


def folded(files: list[str], root: Path) -> list[str]:
    """`files`, with the largest folders all of whose files are listed standing in for them."""
    listed, kept, covered = set(files), [], set()
    folders = sorted({parent.as_posix() for file in files for parent in PurePosixPath(file).parents
                      if parent != PurePosixPath(".")}, key=lambda folder: (folder.count("/"), folder))
    for folder in folders:
        inside = package_files(root, folder)
        if inside <= listed and not inside <= covered:
            kept.append(folder)
            covered |= inside
    return sorted(kept + [file for file in listed if file not in covered])


def _output(output: Output) -> str | dict[str, dict[str, Any]]:
    options: dict[str, Any] = {}
    if output.persist:
        options["persist"] = True
    if not output.cache:
        options["cache"] = False
    if output.why:
        options["desc"] = output.why
    return {output.path.as_posix(): options} if options else output.path.as_posix()


def _templates(stage: Stage, benchmark: Benchmark) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(dvc.yaml stage name, its loop, the arguments as DVC fills them in) for each entry of the stage."""
    if stage.fan_out == "evaluations":  # one entry per main training: its targets are a list of params.yaml
        return [(f"{stage.name}-{auxiliary}", {"matrix": {"target": f"${{main.targets.{auxiliary}}}"}},
                 {"auxiliary": auxiliary, "target": "${item.target}"})
                for auxiliary, targets in benchmark.main.targets.items() if targets]
    loops = {"datasets": ("${datasets}", "${item}"), "trainings": ("${main.targets}", "${key}"),
             "methods": ("${methods}", "${key}"), "experiments": ("${experiments}", "${key}")}
    if stage.fan_out is None:
        return [(stage.name, {}, {})]
    over, value = loops[stage.fan_out]
    return [(stage.name, {"foreach": over}, {name: value for name in stage.arguments})]


def _body(stage: Stage, benchmark: Benchmark, args: Mapping[str, str]) -> dict[str, Any]:
    command = " ".join(["moeclip stage", stage.name, *(args[name] for name in stage.arguments),
                        "--profile ${profile}"])
    writes = stage.writes(TEMPLATE_LAYOUT, benchmark, args)
    body: dict[str, Any] = {
        "cmd": command, "desc": stage.summary,
        "deps": [path.as_posix() for path in stage.inputs(TEMPLATE_LAYOUT, benchmark, args)],
        # The stamps stage tracks every setting (the whole file), each other stage its own through its stamp.
        "params": [{PARAMS_FILE: None}] if ALL_PARAMS in stage.params else [],
        "outs": [_output(output) for output in writes if not output.metric],
        "metrics": [_output(output) for output in writes if output.metric]}
    return {key: value for key, value in body.items() if value}


def render(benchmark: Benchmark) -> str:
    """The text of dvc.yaml for a params file's plan."""
    stages: dict[str, Any] = {}
    for stage in STAGES:
        for name, loop, args in _templates(stage, benchmark):
            body = _body(stage, benchmark, args)
            stages[name] = {**loop, "do": body} if "foreach" in loop else {**loop, **body}
    losses = TEMPLATE_LAYOUT.losses("${main.auxiliary}").as_posix()
    plots = [{"training loss": {"template": "linear", "x": "step", "y": {losses: "loss"}}},
             *((TEMPLATE_LAYOUT.reports / name).as_posix() for name in figure_files(benchmark))]
    document = yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)
    return HEADER + "\n" + document
