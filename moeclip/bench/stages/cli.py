"""`moeclip stage <name> ...`: one command per declared stage, what dvc.yaml runs.

Kept apart from the main command line so that a stage imports only its own code (the launcher sends
`moeclip stage` here directly); its arguments come from the stage's declaration.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import typer

from moeclip.bench.stages import STAGES, Stage, imported_code
from moeclip.bench.stages.common import record_usage
from moeclip.errors import MoeclipError
from moeclip.resources import measured

CONFIG_OPTION = typer.Option(Path("params.yaml"), "--config", help="the params file")
PROFILE_OPTION = typer.Option(None, help="profile of the params file (default: its `profile:` entry)")

stage_app = typer.Typer(help="The pipeline stages that dvc.yaml runs (one unit of work each).",
                        no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def run_stage(stage: Stage, config: Path, profile: str | None, args: dict[str, str]) -> Path:
    """Run one stage call; print its output, then its wall time and peak memory, and keep them with the
    package files it ran in runs/<profile>/usage/<label>.json."""
    label = stage.label(args)
    with measured() as usage:
        output = stage.function()(config, *(args[name] for name in stage.arguments), profile)
    typer.echo(str(output))
    typer.echo(usage[0].stage_line(label), err=True)
    record_usage(config, profile, label, usage[0], imported_code())
    return output


def _command(stage: Stage):
    """A typer command whose positional arguments are the stage's."""
    def command(config: Path, profile: str | None, **args: str) -> None:
        run_stage(stage, config, profile, args)

    parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                    default=typer.Argument(..., show_default=False)) for name in stage.arguments]
    command.__signature__ = inspect.Signature([
        *parameters,
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=CONFIG_OPTION),
        inspect.Parameter("profile", inspect.Parameter.KEYWORD_ONLY, annotation=str | None, default=PROFILE_OPTION)])
    command.__doc__ = stage.summary
    return command


for _stage in STAGES:
    stage_app.command(_stage.name)(_command(_stage))


def reporting_user_errors(command: Callable[[], object]) -> None:
    """Run a command line; a user-fixable error (MoeclipError) becomes one line on stderr and exit status 2,
    without a traceback."""
    try:
        command()
    except MoeclipError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


def run(argv: list[str]) -> None:
    """`moeclip stage <argv>`."""
    reporting_user_errors(lambda: stage_app(args=argv, prog_name="moeclip stage"))
