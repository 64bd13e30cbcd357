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
import threading
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
PROFILE_KEY = "profile"  # params.yaml's choice of profile


def stages_code(stages: Sequence[Stage]) -> dict[str, list[str]]:
    """Each stage's code: the package files (relative to PACKAGE_ROOT) that its process imports.

    Every stage's module is imported once (torch, open_clip and MLflow with them; in a warm stage process
    they already are), then a forked child per stage drops the package's own modules and imports that
    stage's afresh, as the warm stage server does: a child loads what the stage's process loads, in a
    fraction of a second. A process with other threads must not fork: there a fresh interpreter probes.
    """
    names = [stage.name for stage in stages]
    if threading.active_count() == 1:
        found = probe_stages(names)
    else:
        probe = f"import json; from moeclip.bench.dvcfile import probe_stages; print(json.dumps(probe_stages({names!r})))"
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PACKAGE_ROOT,
                              env={**os.environ, "MOECLIP_WARM": "0"}, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"importing the stages failed:\n{done.stderr[-3000:]}")
        found = json.loads(done.stdout)
    return {name: folded(files, PACKAGE_ROOT) for name, files in found.items()}


def probe_stages(names: list[str]) -> dict[str, list[str]]:
    """{stage: the package files its module imports}, each found in a forked child of this single-threaded
    process."""
    modules = {name: get_stage(name).module for name in names}
    for module in modules.values():  # every third-party module the stages need, imported once
        importlib.import_module(module)
    return {name: _imported_in_child(module) for name, module in modules.items()}


def _imported_in_child(module: str) -> list[str]:
    """The package files a fresh import of the stage `module` (and the stage entry) loads, in a forked child."""
    from moeclip.bench.warm import forget_package

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import the stage as its own process would, report what was loaded
        os.close(read)
        status = 1
        try:
            forget_package()
            for entry in (*ENTRY_MODULES, module):
                importlib.import_module(entry)
            with os.fdopen(write, "w") as out:
                json.dump(sys.modules["moeclip.bench.stages"].imported_code(), out)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"importing the stage module '{module}' failed")
    return json.loads(text)


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
    whole_file = ALL_PARAMS in stage.params
    body: dict[str, Any] = {
        "cmd": command, "desc": stage.summary,
        # The stamps stage reads params.yaml as a file (every setting), each other stage its own settings
        # through its stamp. The file as a dependency costs dvc.lock 5 lines where its tracked values
        # cost 1,100, which DVC reads and writes back after every stage (1.3 s each); one tracked key keeps
        # it a params file, so `dvc params diff` and `dvc exp run -S` still see every setting.
        "deps": [path.as_posix() for path in stage.inputs(TEMPLATE_LAYOUT, benchmark, args)],
        "params": [PROFILE_KEY] if whole_file else [],
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
