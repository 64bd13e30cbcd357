"""The Table 1 baselines of params.yaml's `methods`, resolved for a profile into runs the stages train and evaluate.

Each method runs under MoECLIP's protocol: trained (where it needs training) on each auxiliary
dataset of `main.targets` and evaluated zero-shot on that dataset's targets, with the same data
layer, evaluator, metrics and checkpoints.
"""
from __future__ import annotations

from pydantic import ValidationError

from moeclip.bench.experiments import Benchmark, Run, with_overrides
from moeclip.bench.params import ParamsError, Profile, validation_problems
from moeclip.methods.registry import UnknownMethodError, method_config, method_of


def method_runs(benchmark: Benchmark, profile: Profile, method: str) -> list[Run]:
    """One run per Table 1 auxiliary dataset, in params order; errors name the params entry at fault."""
    if method not in benchmark.methods:
        raise ParamsError(f"no method '{method}' in params.yaml `methods` (it has: {', '.join(benchmark.methods)})")
    settings = profile.methods.get(method)
    if settings is None:
        raise ParamsError(f"profile '{profile.name}' has no `methods.{method}` settings")
    where = f"profiles.{profile.name}.methods.{method}"
    try:
        model = method_config(method, settings.model)
    except UnknownMethodError as err:
        raise ParamsError(f"params.yaml `methods.{method}`: {err}") from None
    except ValidationError as err:
        raise ParamsError(f"{where}.model is invalid: {validation_problems(err)}") from None
    if (settings.train is None) == method_of(model).needs_training:
        raise ParamsError(f"{where}.train: {method} is {'trained' if settings.train is None else 'training-free'}, "
                          f"so it needs {'a train section' if settings.train is None else 'train: null'}")
    label = benchmark.methods[method].label
    base = settings.train or profile.train  # a training-free method's checkpoint is built with the profile's seed
    return [Run(auxiliary, label, model, with_overrides(base, settings.train_by_auxiliary.get(auxiliary, {}),
                                                        f"{where}.train_by_auxiliary"),
                (auxiliary,), settings.train is not None)
            for auxiliary in benchmark.table1_trainings]
