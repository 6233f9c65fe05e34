"""Command-line interface: ``relaxtune relax | finetune | evaluate | report | data``.

Each command lives in its own module and registers itself on ``app``. Errors users can fix (bad files,
unsupported elements) are raised as ``UserInputError`` and printed as one line with exit code 2.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


class UserInputError(Exception):
    """A problem with the user's input, reported as one line (no traceback), exit code 2."""


def _register() -> None:
    import importlib

    for name in ("relax_cmd", "finetune_cmd", "evaluate_cmd", "report_cmd", "data_cmd"):
        try:
            importlib.import_module(f"relaxtune.cli.{name}")
        except ModuleNotFoundError as exc:  # a command not written yet
            if exc.name != f"relaxtune.cli.{name}":
                raise


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    _register()
    try:
        app(standalone_mode=False)
    except UserInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
            typer.echo("aborted", err=True)
            sys.exit(130)
        raise
