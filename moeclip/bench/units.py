"""Units of work: each training and each (trained model, dataset) evaluation of a stage call on its own.

A stage call (what DVC runs, `experiment@table9`) is its units and a gathering step. `dvc repro` runs a
call's units on the profile's local workers (`run_units`), wave after wave as their inputs are ready;
the Prefect flow submits every unit of every call to its task runner (a process pool, or Ray, where a
unit that needs an accelerator asks for one), so a sweep's trainings spread over every GPU of a cluster.
Either way a unit is the same function on the same arguments and writes the same files, and each is
idempotent (a finished training is kept, an evaluation whose inputs did not change is read back), so
either can continue what the other did.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moeclip.bench.params import RuntimeConfig
from moeclip.bench.stages import add_worker_code, imported_code
from moeclip.runtime import pin_runtime


# The stages whose calls are several units and a gathering step (their modules have `units` and `gather`).
SPLIT_STAGES = ("experiment", "baseline")


@dataclass(frozen=True)
class Workload:
    """What a unit pushes through its model, for the planner's estimate of its time (moeclip/bench/planning.py)."""

    images: int             # images of one pass (a training's epoch, an evaluation's test set)
    image_size: int
    epochs: int = 0         # a training's passes; 0 for an evaluation


@dataclass(frozen=True)
class Unit:
    """One schedulable piece of work of a stage call."""

    name: str                   # its task's name: 'train/table9/1, 3', 'evaluate/table9/1, 3/mvtec'
    gpu: bool                   # runs a model (a training or an evaluation), so it wants an accelerator
    work: Callable[..., Any]    # a module-level function, so a process pool or Ray can ship it
    args: tuple[Any, ...]
    after: tuple[str, ...] = ()  # units of the same call whose outputs it reads
    workload: Workload | None = None  # None: no model work worth costing (building an untrained model)

    def run(self) -> Any:
        return self.work(*self.args)


def training_workload(run: Any) -> Workload:
    """A run's training: an epoch reads every image of its auxiliary datasets (their published sizes); a method
    trained in stages (AA-CLIP) counts the epochs of all of them."""
    from moeclip.data.registry import get_dataset
    from moeclip.methods.registry import method_of

    stages = method_of(run.model).training_stages(run.model, run.train)
    return Workload(sum(get_dataset(name).train_images for name in run.train_on), run.model.image_size,
                    sum(stage.config.epochs for stage in stages))


def evaluation_workload(run: Any, dataset: str) -> Workload:
    """A run's evaluation on `dataset`: its published test set."""
    from moeclip.data.registry import get_dataset

    return Workload(get_dataset(dataset).test_images, run.model.image_size)


def check_units(units: Sequence[Unit]) -> None:
    """Names are unique and every `after` names an earlier unit (so plan order is a valid run order)."""
    seen: set[str] = set()
    for unit in units:
        if unit.name in seen:
            raise ValueError(f"two units are named '{unit.name}'")
        missing = [name for name in unit.after if name not in seen]
        if missing:
            raise ValueError(f"unit '{unit.name}' waits for {missing}, which no earlier unit is")
        seen.add(unit.name)


def run_units(units: Sequence[Unit], runtime: RuntimeConfig) -> dict[str, Any]:
    """Every unit's result by name, run in waves (the units whose inputs are ready) on `runtime.workers`."""
    check_units(units)
    results: dict[str, Any] = {}
    pending = list(units)
    while pending:
        ready = [unit for unit in pending if all(name in results for name in unit.after)]
        for unit, result in zip(ready, in_processes(run_unit, [(unit,) for unit in ready], runtime)):
            results[unit.name] = result
        pending = [unit for unit in pending if unit.name not in results]
    return results


def run_unit(unit: Unit) -> Any:
    return unit.run()


def in_processes(function: Callable[..., Any], calls: list[tuple], runtime: RuntimeConfig) -> list[Any]:
    """`function(*call)` for every call, in order, spread over up to `runtime.workers` processes.

    Where the profile measures time, calls run one at a time, each in a process of its own:
    a call's wall time and peak memory are then its own, not inflated by another beside it or by
    memory an earlier one left to the allocator.
    """
    if runtime.measure_time:
        return [_pooled(function, [call], 1, runtime)[0] for call in calls]
    workers = min(runtime.workers, len(calls))
    if workers <= 1:
        return [function(*call) for call in calls]
    return _pooled(function, calls, workers, runtime)


def _call_in_worker(function: Callable[..., Any], call: tuple) -> tuple[Any, list[str]]:
    """A worker's result, and the package files the worker had loaded (the stage's code too)."""
    return function(*call), imported_code()


def _pooled(function: Callable[..., Any], calls: list[tuple], workers: int, runtime: RuntimeConfig) -> list[Any]:
    """The calls in a pool of `workers` new processes, pinned like the stage (threads, kernels), so results
    are the same bits as in one process. A single-threaded stage (DVC's, the warm server's) forks its
    imported modules; a multi-threaded one (a Prefect task) must not fork and spawns fresh interpreters."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if threading.active_count() == 1 else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=pin_runtime,
                             initargs=(runtime.threads, runtime.deterministic)) as pool:
        outcomes = list(pool.map(_call_in_worker, [function] * len(calls), calls))
    for _, code in outcomes:
        add_worker_code(code)
    return [result for result, _ in outcomes]
