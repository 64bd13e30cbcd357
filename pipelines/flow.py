"""The `zsad-benchmark` Prefect flow: the stages of dvc.yaml as tasks, fanned out per dataset, training and experiment.

Each task is a stage function of moeclip/bench/pipeline.py, unchanged, so the flow and `dvc repro`
produce the same files. Tasks run in a process pool: a training draws its dropout from the
global torch RNG, which threads would share (and so lose the seed's reproducibility), and a
process per stage is also what DVC gives each stage. ZSAD_MAX_WORKERS (default 2) caps how
many stages run at once; stages are CPU/GPU heavy, so keep it near the number of GPUs.
"""
from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ProcessPoolTaskRunner

from moeclip.bench import pipeline
from moeclip.bench.experiments import load_plan
from pipelines.caching import StageCache, outputs_exist
from pipelines.plan import plan_stages

MAX_WORKERS = int(os.environ.get("ZSAD_MAX_WORKERS", "2"))
FETCH_RETRY_DELAYS = [30, 120, 600]  # seconds; downloads fail transiently (servers, rate limits)

# The stage functions, unchanged, as tasks; keyed by the stage names dvc.yaml uses.
STAGES = {stage.name: stage for stage in (
    task(pipeline.fetch, name="fetch", task_run_name="fetch-{dataset}", retries=len(FETCH_RETRY_DELAYS),
         retry_delay_seconds=FETCH_RETRY_DELAYS, cache_policy=StageCache(stage="fetch")),
    task(pipeline.prepare, name="prepare", task_run_name="prepare-{dataset}", cache_policy=StageCache(stage="prepare")),
    task(pipeline.train, name="train", task_run_name="train-{auxiliary}", cache_policy=StageCache(stage="train")),
    task(pipeline.evaluate, name="evaluate", task_run_name="evaluate-{auxiliary}-{target}",
         cache_policy=StageCache(stage="evaluate")),
    task(pipeline.run_experiment, name="experiment", task_run_name="experiment-{experiment}",
         cache_policy=StageCache(stage="experiment")),
    task(pipeline.analyse, name="analysis", cache_policy=StageCache(stage="analysis")),
    task(pipeline.report, name="report", cache_policy=StageCache(stage="report")),
)}


def create_tracking_store(uri: str) -> None:
    """Open the MLflow store once before stages run in parallel: concurrent first opens of a new
    SQLite store race in MLflow's schema migrations (alembic CommandError)."""
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


@flow(name="zsad-benchmark", task_runner=ProcessPoolTaskRunner(max_workers=MAX_WORKERS))
def zsad_benchmark(params: str = "params.yaml", profile: str | None = None, datasets: list[str] | None = None,
                   experiments: list[str] | None = None, report: bool = True, refresh: bool = False) -> dict[str, str]:
    """Run the benchmark of `params` (paths relative to the working directory); returns each stage's output path.

    profile: default the params file's `profile:`. datasets: a subset of params.yaml's datasets
    (default all); trainings, evaluations, experiments and the analysis that read a left-out
    dataset are skipped. experiments: default all that the datasets allow, [] for none.
    report: render the tables and figures, possible only when nothing was left out.
    refresh: ignore cached results and run every stage again.
    """
    logger = get_run_logger()
    path = Path(params)
    benchmark, active = load_plan(path, profile)
    plan = plan_stages(benchmark, active, datasets, experiments)
    logger.info("profile %s: %d datasets, %d trainings, %d evaluations, experiments %s, analysis %s",
                active.name, len(plan.datasets), len(plan.trainings), len(plan.evaluations),
                list(plan.experiments), plan.analysis)
    create_tracking_store(active.tracking.uri)
    runs: dict[str, PrefectFuture] = {}

    def submit(stage: str, wait_for: list[PrefectFuture], **args: str) -> PrefectFuture:
        """Queue one stage call; it runs despite a cached result when asked to or when its outputs are gone."""
        rerun = refresh or not outputs_exist(stage, benchmark, active, args)
        return STAGES[stage].with_options(refresh_cache=rerun).submit(
            params=path, profile_name=active.name, wait_for=wait_for, **args)

    for dataset in plan.datasets:
        runs[f"fetch/{dataset}"] = submit("fetch", [], dataset=dataset)
        runs[f"prepare/{dataset}"] = submit("prepare", [runs[f"fetch/{dataset}"]], dataset=dataset)
    prepared = [runs[f"prepare/{dataset}"] for dataset in plan.datasets]
    for auxiliary in plan.trainings:
        runs[f"train/{auxiliary}"] = submit("train", [runs[f"prepare/{auxiliary}"]], auxiliary=auxiliary)
    trained = [runs[f"train/{auxiliary}"] for auxiliary in plan.trainings]
    for auxiliary, target in plan.evaluations:
        runs[f"evaluate/{auxiliary}/{target}"] = submit(
            "evaluate", [runs[f"train/{auxiliary}"], runs[f"prepare/{target}"]], auxiliary=auxiliary, target=target)
    evaluated = [runs[f"evaluate/{auxiliary}/{target}"] for auxiliary, target in plan.evaluations]
    for experiment in plan.experiments:  # its variants may reuse any main training and main results
        runs[f"experiment/{experiment}"] = submit("experiment", [*prepared, *trained, *evaluated],
                                                  experiment=experiment)
    if plan.analysis:
        runs["analysis"] = submit("analysis", [runs[f"train/{benchmark.main.auxiliary}"], *prepared])
    if report and plan.complete:
        runs["report"] = submit("report", list(runs.values()))
    elif report:
        logger.info("report skipped: it needs every dataset, experiment and the analysis, and this run left some out")

    wait(list(runs.values()))  # let independent stages finish before a failure ends the run
    return {label: str(future.result()) for label, future in runs.items()}
