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


def _usage_error_types() -> tuple[type, ...]:
    """The exception classes of command-line usage errors (bad option values, unknown options): typer's own
    (typer >= 0.16 vendors click) and click's, when click is installed."""
    import importlib

    found = []
    for module, name in (("typer", "TyperException"), ("click.exceptions", "ClickException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line read as one line, without the source line that raised them."""
    return f"warning: {message}\n"


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    import warnings

    warnings.formatwarning = _one_line_warning
    _register()
    usage_errors = _usage_error_types()
    try:
        app(standalone_mode=False)
    except UserInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except usage_errors as exc:
        if hasattr(exc, "show"):
            exc.show()
        else:
            typer.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
