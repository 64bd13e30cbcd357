"""The `zsad-benchmark` Prefect flow: every unit of the plan (moeclip/bench/units.py) as its own task, on a
local process pool or on a Ray cluster.

A stage call that does one thing (fetch, prepare, a main training or evaluation, the analysis, the
report) is one task, cached by its declared inputs (pipelines/caching.py). An experiment or a baseline is
split: each training and each (trained model, dataset) evaluation is a task of its own, named for the
Prefect UI (`train/table9/1, 3`, `evaluate/table9/1, 3/mvtec`), then the call's gathering task writes its
metrics. Units are the functions `dvc repro` runs, on the same arguments, and each is idempotent, so the
flow and `dvc repro` write the same files and either continues what the other did.

Engines (`engine`): `local`, a pool of ZSAD_MAX_WORKERS processes (default 2; keep it near the number
of GPUs); `ray`, Ray through prefect-ray: a cluster the flow starts on this machine, or an existing one
by `ray_address` (`ray start --head` on one machine, `ray start --address=...` on the others). On Ray a
unit that runs a model asks for a GPU when the cluster has any (Ray pins it to one), for a CPU otherwise;
a unit whose worker dies is run again elsewhere (a training resumes from its checkpoint).
Tasks run in processes, not threads: a training draws its dropout from the global torch RNG, which
threads would share.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient
from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from moeclip.bench.experiments import Benchmark, load_plan
from moeclip.bench.launch import CPU_KERNEL_PINS
from moeclip.bench.params import Profile, RuntimeConfig
from moeclip.bench.stages import STAGES, Stage, get_stage, unit_name, waits_for
from moeclip.bench.units import SPLIT_STAGES, Unit, check_units
from pipelines.caching import StageCache, outputs_exist
from pipelines.plan import plan_stages

MAX_WORKERS = int(os.environ.get("ZSAD_MAX_WORKERS", "2"))
FETCH_RETRY_DELAYS = [30, 120, 600]  # seconds; downloads fail transiently (servers, rate limits)
Engine = Literal["local", "ray"]


def stage_task(stage: Stage) -> Task:
    """The stage's `run` as a task named like the unit it is."""
    retries = FETCH_RETRY_DELAYS if stage.name == "fetch" else []
    name = unit_name(stage, {a: f"{{{a}}}" for a in stage.arguments})
    return task(stage.function(), name=stage.name, task_run_name=name, retries=len(retries),
                retry_delay_seconds=retries)


TASKS = {stage.name: stage_task(stage) for stage in STAGES}


@task(name="unit", task_run_name="{name}", cache_policy=NO_CACHE)
def run_unit(name: str, unit: Unit, root: str, runtime: RuntimeConfig) -> Any:
    """One unit in the repository `root` (a worker's directory may be another), pinned like a stage."""
    from moeclip.runtime import pin_runtime

    os.chdir(root)
    pin_runtime(runtime.threads, runtime.deterministic)
    return unit.run()


@task(name="gather", task_run_name="{label}")
def gather(label: str, stage: str, params: Path, profile_name: str, args: dict[str, str]) -> str:
    """A split call's last step: its metrics from its units' results."""
    benchmark, profile = load_plan(params, profile_name)
    return str(import_module(get_stage(stage).module).gather(benchmark, profile, *args.values()))


def create_tracking_store(uri: str) -> None:
    """Open the MLflow store once before stages run in parallel: concurrent first opens of a new
    SQLite store race in MLflow's schema migrations (alembic CommandError)."""
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def pin_cpu_kernels() -> None:
    """The CPU kernels a `moeclip` process pins (moeclip/bench/launch.py), in this process's environment:
    the process pool's and a local Ray cluster's workers inherit them (an existing cluster's workers get
    them from `task_runner`), so the flow's numbers are `dvc repro`'s to the bit. Unpinned, MKL's own code
    path moved a demo training's weights by 1e-3, and numbers of reports/demo with them."""
    for name, value in CPU_KERNEL_PINS.items():
        os.environ.setdefault(name, value)


def task_runner(engine: Engine, ray_address: str | None, workers: int) -> TaskRunner:
    """The engine's task runner; a Ray worker gets this process's Prefect API, package path and CPU kernels."""
    if engine == "local":
        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect.settings import PREFECT_API_URL

    env = {name: value for name, value in os.environ.items()
           if name.startswith(("MOECLIP_", "MLFLOW_", "HF_", "PREFECT_"))
           or name in ("PYTHONPATH", *CPU_KERNEL_PINS)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd().resolve()), env.get("PYTHONPATH")]))
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # else each worker starts a server of its own
    init: dict[str, Any] = {"runtime_env": {"env_vars": env}}
    if ray_address is None:
        init["num_cpus"] = workers
    return _ray_task_runner(ray_address, init)


def _ray_task_runner(address: str | None, init_kwargs: dict[str, Any]) -> TaskRunner:
    """prefect-ray's runner, with a task's `wait_for` futures made Ray dependencies of the task, and Ray's
    name of a task its unit's (`train/visa`, `evaluate/table9/1, 3/mvtec`), not its function's (`unit`):
    what Ray's dashboard, `ray list tasks`, its errors and a worker's process title (`ray::train/visa`) show.

    prefect-ray (0.6) hands Ray only the futures among a task's parameters; the futures of `wait_for`
    (how this flow orders its calls) are waited on inside the task, by a worker Ray has already started
    for it. A worker blocked there lends its CPU back, so Ray starts another worker for the next task, and
    so on: every unit of the plan soon sits in a process of its own (about 1 GB each), importing torch on
    cores the running units need. Here Ray starts a task once what it waits for is done, as the local
    process pool does (it waits for `wait_for` before it submits). A task whose upstream Ray task failed
    as such (its worker died more often than Ray retries) fails on that error without running."""
    from prefect_ray import RayTaskRunner
    from prefect_ray.task_runners import PrefectRayFuture

    class DependentRayTaskRunner(RayTaskRunner):
        _waits: list[Any] = []  # the Ray futures of the task being submitted

        def submit(self, task: Task, parameters: dict[str, Any], wait_for: Any = None,
                   dependencies: Any = None) -> PrefectFuture:
            self._waits = [future.wrapped_future for future in wait_for or ()
                           if isinstance(future, PrefectRayFuture)]
            if isinstance(task.task_run_name, str):  # this flow's names are templates of string parameters
                task = task.with_options(name=task.task_run_name.format(**parameters))
            try:
                return super().submit(task, parameters, wait_for, dependencies)
            finally:
                self._waits = []

        def _exchange_prefect_for_ray_futures(self, parameters: dict[str, Any]) -> tuple[dict[str, Any], list]:
            exchanged, upstream = super()._exchange_prefect_for_ray_futures(parameters)
            return exchanged, upstream + self._waits  # Ray runs the task when its arguments are ready

    return DependentRayTaskRunner(address=address, init_kwargs=init_kwargs)


@contextmanager
def _resources(engine: Engine, gpu: bool) -> Iterator[None]:
    """What a unit asks Ray for: a GPU when it runs a model and the cluster has one, else a CPU."""
    if engine == "local":
        yield
        return
    import ray
    from prefect_ray.context import remote_options

    wants_gpu = gpu and ray.cluster_resources().get("GPU", 0) > 0
    with remote_options(num_gpus=1) if wants_gpu else remote_options(num_cpus=1):
        yield


def _check_cluster(engine: Engine, profile: Profile) -> None:
    """A file-based tracking store cannot be shared by several machines: refused before any work."""
    if engine == "ray":
        import ray

        from moeclip.bench.tracking import check_tracking_for_cluster

        check_tracking_for_cluster(profile.tracking.uri, sum(node["Alive"] for node in ray.nodes()))


@flow(name="zsad-benchmark")
def zsad_benchmark(params: str = "params.yaml", profile: str | None = None, datasets: list[str] | None = None,
                   experiments: list[str] | None = None, report: bool = True, refresh: bool = False,
                   engine: Engine = "local", ray_address: str | None = None,
                   workers: int = MAX_WORKERS) -> dict[str, str]:
    """Run the benchmark of `params` (paths relative to the working directory); returns each call's output path.

    profile: default the params file's `profile:`. datasets: a subset of params.yaml's datasets
    (default all); trainings, evaluations, baselines, experiments and the analysis that read a
    left-out dataset are skipped. experiments: default all that the datasets allow, [] for none.
    report: render the tables and figures, possible only when nothing was left out.
    refresh: ignore cached results and run every stage again.
    engine: `local` (a process pool of `workers`) or `ray` (a Ray cluster of `workers` CPUs started here,
    or the cluster at `ray_address`).
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
    waits = waits_for(calls, benchmark, active.layout)
    pin_cpu_kernels()
    with task_runner(engine, ray_address, workers) as runner:
        _check_cluster(engine, active)
        create_tracking_store(active.tracking.uri)
        done: dict[str, PrefectFuture] = {}  # each call's last task
        every: list[PrefectFuture] = []
        for name, args in calls:
            stage = get_stage(name)
            label = stage.label(args)
            before = [done[other] for other in waits[label]]
            if name in SPLIT_STAGES:
                futures = _submit_units(runner, stage, benchmark, active, args, before, engine)
                every += futures
                done[label] = runner.submit(gather, {"label": label, "stage": name, "params": path,
                                                     "profile_name": active.name, "args": args}, before + futures)
            else:
                rerun = refresh or not outputs_exist(stage, benchmark, active, args)  # outputs gone: run despite a cache
                with _resources(engine, name in ("train", "evaluate", "analysis")):
                    done[label] = runner.submit(
                        TASKS[name].with_options(cache_policy=StageCache(stage=name), refresh_cache=rerun),
                        {"params": path, "profile_name": active.name, **args}, before)
            every.append(done[label])
        wait(every)  # let independent units finish before a failure ends the run
        return {label: str(future.result()) for label, future in done.items()}


def _submit_units(runner: TaskRunner, stage: Stage, benchmark: Benchmark, profile: Profile, args: dict[str, str],
                  before: list[PrefectFuture], engine: Engine) -> list[PrefectFuture]:
    """Every unit of a split call, each after the calls it reads from and the units of its own call it needs."""
    units = import_module(stage.module).units(benchmark, profile, *args.values())
    check_units(units)
    root = str(Path.cwd().resolve())
    submitted: dict[str, PrefectFuture] = {}
    for unit in units:
        with _resources(engine, unit.gpu):
            submitted[unit.name] = runner.submit(run_unit, {"name": unit.name, "unit": unit, "root": root,
                                                            "runtime": profile.runtime},
                                                 before + [submitted[name] for name in unit.after])
    return list(submitted.values())
