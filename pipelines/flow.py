"""The `zsad-benchmark` Prefect flow: the declared stages (moeclip/bench/stages/) as tasks, fanned out per
dataset, training, baseline and experiment.

Each task is a stage's `run`, unchanged, so the flow and `dvc repro` produce the same files. A call
waits for every call that writes a path it reads (what DVC derives from dvc.yaml), and its cache
key follows the stage's declared inputs (pipelines/caching.py). Tasks run in a process pool: a
training draws its dropout from the global torch RNG, which threads would share (and so lose the
seed's reproducibility), and a process per stage is also what DVC gives each stage.
ZSAD_MAX_WORKERS (default 2) caps how many stages run at once; stages are CPU/GPU heavy, so keep it
near the number of GPUs.
"""
from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import Task, flow, get_run_logger, task
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ProcessPoolTaskRunner

from moeclip.bench.experiments import load_plan
from moeclip.bench.stages import STAGES, Stage, get_stage
from pipelines.caching import StageCache, outputs_exist
from pipelines.plan import plan_stages, waits_for

MAX_WORKERS = int(os.environ.get("ZSAD_MAX_WORKERS", "2"))
FETCH_RETRY_DELAYS = [30, 120, 600]  # seconds; downloads fail transiently (servers, rate limits)


def stage_task(stage: Stage) -> Task:
    """The stage's `run` as a task named as DVC names the stage's calls."""
    retries = FETCH_RETRY_DELAYS if stage.name == "fetch" else []
    return task(stage.function(), name=stage.name, task_run_name=stage.label({a: f"{{{a}}}" for a in stage.arguments}),
                retries=len(retries), retry_delay_seconds=retries)


TASKS = {stage.name: stage_task(stage) for stage in STAGES}


def create_tracking_store(uri: str) -> None:
    """Open the MLflow store once before stages run in parallel: concurrent first opens of a new
    SQLite store race in MLflow's schema migrations (alembic CommandError)."""
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


@flow(name="zsad-benchmark", task_runner=ProcessPoolTaskRunner(max_workers=MAX_WORKERS))
def zsad_benchmark(params: str = "params.yaml", profile: str | None = None, datasets: list[str] | None = None,
                   experiments: list[str] | None = None, report: bool = True, refresh: bool = False) -> dict[str, str]:
    """Run the benchmark of `params` (paths relative to the working directory); returns each stage's output path.

    profile: default the params file's `profile:`. datasets: a subset of params.yaml's datasets
    (default all); trainings, evaluations, baselines, experiments and the analysis that read a
    left-out dataset are skipped. experiments: default all that the datasets allow, [] for none.
    report: render the tables and figures, possible only when nothing was left out.
    refresh: ignore cached results and run every stage again.
    """
    logger = get_run_logger()
    path = Path(params)
    benchmark, active = load_plan(path, profile)
    plan = plan_stages(benchmark, active, datasets, experiments)
    logger.info("profile %s: %d datasets, %d trainings, %d evaluations, baselines %s, experiments %s, analysis %s",
                active.name, len(plan.datasets), len(plan.trainings), len(plan.evaluations), list(plan.methods),
                list(plan.experiments), plan.analysis)
    if report and not plan.complete:
        logger.info("report skipped: it needs every dataset, experiment and the analysis, and this run left some out")
    calls = plan.calls(report)
    create_tracking_store(active.tracking.uri)
    waits = waits_for(calls, benchmark, active)
    runs: dict[str, PrefectFuture] = {}
    for name, args in calls:
        stage = get_stage(name)
        label = stage.label(args)
        rerun = refresh or not outputs_exist(stage, benchmark, active, args)  # outputs gone: run despite a cache
        runs[label] = TASKS[name].with_options(cache_policy=StageCache(stage=name),
                                               refresh_cache=rerun).submit(
            params=path, profile_name=active.name, wait_for=[runs[other] for other in waits[label]], **args)
    wait(list(runs.values()))  # let independent stages finish before a failure ends the run
    return {label: str(future.result()) for label, future in runs.items()}
