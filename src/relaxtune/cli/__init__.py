"""Command-line interface: ``relaxtune relax | finetune | evaluate | report | data``.

Each command lives in its own module and registers itself on ``app``. Errors users can fix (bad files,
unsupported elements) are raised as ``UserInputError`` and printed as one line with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from relaxtune import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"relaxtune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Fine-tune interatomic potentials so that their relaxations land where DFT's do."""


class UserInputError(Exception):
    """A problem with the user's input, reported as one line (no traceback), exit code 2."""


#: help text of every command's ``--threads``
THREADS_HELP = ("torch CPU threads (0 = every core this process may use). Running several jobs on one machine, "
                "give each its share (e.g. --threads 1 each on 2 cores): oversubscribed cores run many times slower.")


def check_writable(path: Path, option: str) -> None:
    """Fail before any compute if ``path`` cannot be written (a folder, a missing or read-only folder)."""
    import os

    if path.is_dir():
        raise UserInputError(f"{option} {path}: is a folder, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserInputError(f"{option} {path}: not writable")


def use_threads(threads: int) -> int:
    """Set torch's CPU threads: ``threads``, or with 0 the cores this process may use, shared evenly by the
    processes torchrun started on this machine (``LOCAL_WORLD_SIZE``). Returns the number."""
    import os

    import torch

    if threads > 0:
        n = threads
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    return n


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
        code = app(standalone_mode=False)  # click returns (not raises) the code of an Exit, e.g. 130 on Ctrl-C
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
    if isinstance(code, int) and code:
        if code == 130:
            typer.echo("aborted", err=True)
        sys.exit(code)
