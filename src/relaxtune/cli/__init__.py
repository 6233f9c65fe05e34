"""Command-line interface: ``relaxtune relax | finetune | evaluate | report | data``.

Each command lives in its own module and registers itself on ``app``. Errors users can fix (bad files,
unsupported elements, bad option values) are printed as one line with exit code 2, never a traceback: commands
raise ``UserInputError``; usage errors (an unknown option, a value out of range or not among the choices) are
typer's, turned into one line by ``main``. Ctrl-C ends a command with one line (``aborted``, or what the
command kept) and exit code 130; commands write their outputs as they go, atomically, so that nothing finished
is lost.

One convention for the options, stated in every command's ``--help`` (:data:`CONVENTION`): ``-o/--output``
names an output file, ``--out`` an output folder, ``--json`` a JSON output file, ``-m/--model`` the model;
options with a fixed set of values list them (``<fire|gd|lbfgs>``).
"""

from __future__ import annotations

import importlib
import sys
import warnings

import typer

# each command module registers its command on ``app`` when imported
from relaxtune.cli import data_cmd, evaluate_cmd, finetune_cmd, relax_cmd, report_cmd  # noqa: F401
from relaxtune.cli.common import UserInputError, app, one_line, take_abort_note


def _usage_error_types() -> tuple[type, ...]:
    """The exception classes of command-line usage errors (bad option values, unknown options): typer's own
    (typer >= 0.16 vendors click) and click's, when click is installed."""
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


def _usage_line(exc: Exception) -> str:
    """A usage error as one line: typer's message (without pydantic's 'Value error, ') and where help is."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = one_line(message.replace("Value error, ", ""))
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return f"error: {message}"


def _aborted() -> None:
    note = take_abort_note()
    note = f": {note}" if note else ""
    typer.echo(f"aborted{note}", err=True)
    sys.exit(130)


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    warnings.formatwarning = _one_line_warning
    take_abort_note()  # a note of an earlier call (tests run many in one process)
    usage_errors = _usage_error_types()
    try:
        # click returns (not raises) the code of an Exit, e.g. 130 on Ctrl-C; usage and help name the program
        # 'relaxtune' however it was started (python -m relaxtune, the console script, the tests)
        code = app(standalone_mode=False, prog_name="relaxtune")
    except UserInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _aborted()
    except usage_errors as exc:
        typer.echo(_usage_line(exc), err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    if isinstance(code, int) and code:
        if code == 130:
            _aborted()
        sys.exit(code)
