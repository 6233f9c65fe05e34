"""What every command of the command line shares: the typer ``app`` they register on, ``UserInputError``,
the option convention and choices, and checks of models and output paths made before any compute."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

import torch
import typer

from relaxtune import __version__
from relaxtune.potentials import MODEL_CHOICES, is_mace_file, load_model
from relaxtune.evaluate import STARTS
from relaxtune.potentials.checkpoint import read_checkpoint
from relaxtune.relax import OPTIMIZERS
from relaxtune.relax.implicit import GRAD_MODES
from relaxtune.train.config import DTYPES, HYBRID_HEADS

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Command-line interface: ``relaxtune relax | finetune | evaluate | report | data``.")


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

#: the epilog of every command's --help: one spelling of each kind of option across the commands
CONVENTION = ("Options of every relaxtune command: -o/--output FILE writes a file, --out DIR a folder, --json FILE "
              "a JSON file; -m/--model names the model; <a|b|c> lists the values an option takes.")

#: the values of the options with a fixed set of choices, as the library defines them
GRADS = GRAD_MODES[1:]
#: the pure-torch test potentials: run in float64 by default (machine-precision checks), ML models in float32
CLASSICAL = frozenset({"lj", "sw"})


def default_dtype(model: str) -> str:
    """The dtype a command uses for ``model`` when none is given: float64 for ``CLASSICAL``, else float32."""
    return "float64" if str(model).lower() in CLASSICAL else "float32"

_abort_note: list[str] = []


def note_on_abort(note: str) -> None:
    """What an interrupted command kept (e.g. '12 of 50 structures are in out.extxyz'): ``main`` prints it on
    its one line after 'aborted'. The latest note wins."""
    _abort_note[:] = [note]


def take_abort_note() -> str | None:
    """The latest ``note_on_abort`` (None if none), forgotten once taken."""
    note = _abort_note[0] if _abort_note else None
    _abort_note.clear()
    return note


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C inside the block takes effect when it ends: an output file and the count of what it holds (for
    the 'aborted' line) change together. Only in the main thread (elsewhere signals are not Python's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def one_line(text: object) -> str:
    return " ".join(str(text).split())


#: (pattern, plain words) for what ASE, torch and Python say when a file is not what its reader expects. A pattern
#: matches from the start of the message or after a ': ' to its end; what comes before (file, structure, field)
#: is kept.
_PLAIN_READ_ERRORS = [(re.compile(r"(?:^|(?<=: ))" + pattern), plain) for pattern, plain in [
    (r"Expected xyz header but got:.*", "not an (ext)xyz file: each frame must begin with its number of atoms"),
    (r"This is not an ULM formatted file.*", "not an ASE trajectory (.traj) file"),
    (r"Not a BundleTrajectory:.*", "not an ASE trajectory (.traj) file"),
    (r"'utf-?8' codec can't decode.*", "binary content where text was expected (is the extension right?)"),
    (r"(?:Could not guess file type|Unknown file type|UnknownFileTypeError).*",
     "unknown file format: give the file a known extension (.extxyz, .xyz, .traj, .cif, ...) or name (POSCAR, "
     "vasprun.xml, OUTCAR)"),
    (r"Empty file.*", "empty file"),
    (r"(?:invalid literal for \w+\(\) with base \d+|could not convert string to \w+):.*",
     "malformed file: a number was expected"),
    (r"(?:could not broadcast input array|'?\w+'? object (?:has no attribute|is not subscriptable|is not iterable)"
     r"|index -?\d+ is out of bounds|list index out of range|(?:not enough|too many) values to unpack"
     r"|cannot unpack).*", "malformed file"),
    (r"'([A-Z][a-z]{0,2})'$", r"unknown element symbol '\1'"),  # KeyError of a symbol lookup
    (r"'(\w+)'$", r"missing field '\1'"),  # KeyError of another lookup
    # torch.load (weights_only) on something that is not a relaxtune checkpoint
    (r"not a readable relaxtune checkpoint \(\w+: .*Unsupported global.*\)$",
     "not a relaxtune checkpoint: it holds pickled Python objects, which relaxtune does not load"),
    (r"not a readable relaxtune checkpoint \(.*\)$",
     "not a relaxtune checkpoint (not a file that torch.save wrote, or a damaged one)"),
]]


def plain_reason(exc: BaseException | str) -> str:
    """One line saying why a file could not be read, without the reader's internals (exception class names,
    ``'Xx'`` for an unknown element, parser state, torch's ``weights_only`` advice)."""
    text = one_line(exc)
    if isinstance(exc, StopIteration):
        return "no structures in the file"
    text = re.sub(r"(?:^|(?<=: ))ase\.io\.\w+: ", "", text)  # the reader's module
    if not text:
        return "malformed file"
    for pattern, plain in _PLAIN_READ_ERRORS:
        match = pattern.search(text)
        if match:
            return text[: match.start()] + match.expand(plain)
    if isinstance(exc, (AttributeError, TypeError, IndexError, AssertionError, KeyError)):
        return "malformed file"
    return text


def file_error(name: str, exc: BaseException | str) -> "UserInputError":
    """``UserInputError`` "NAME: reason" in plain words. A reason that begins with NAME, or with the value NAME
    names ("--model x.pt", "TRAIN dir/"), does not repeat it."""
    reason = plain_reason(exc)
    for prefix in (name, name.split(" ", 1)[-1]):
        if reason.startswith(f"{prefix}: "):
            reason = reason[len(prefix) + 2:]
    return UserInputError(f"{name}: {reason}")


def check_model(spec: str, option: str = "--model") -> None:
    """Before any compute: ``spec`` names a model (chgnet, sevennet, lj, sw), a MACE file or a readable relaxtune
    checkpoint (read, not built: cheap). One-line ``UserInputError`` otherwise."""
    name = str(spec).strip()
    if name.lower() in {"chgnet", "chgnet-0.3.0", "sevennet", "7net-0", "sevennet-0", "lj", "sw"}:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserInputError(f"{option} {name}: is a folder (give the checkpoint in it, e.g. {path / 'best.pt'})")
    if not path.exists():
        if path.suffix in (".pt", ".model", ".pth") or len(path.parts) > 1:
            raise UserInputError(f"{option} {name}: no such file")
        raise UserInputError(f"{option} {name}: unknown model: use {MODEL_CHOICES}")
    if is_mace_file(path):
        return
    try:
        read_checkpoint(path)
    except (ValueError, OSError) as exc:
        raise file_error(f"{option} {name}", exc) from None


def load_model_or_fail(spec: str, dtype=None, option: str = "--model"):
    """``relaxtune.potentials.load_model`` (``dtype`` None: its default) with its errors as one plain line naming
    the option."""
    check_model(spec, option)
    try:
        return load_model(spec) if dtype is None else load_model(spec, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, KeyError) as exc:
        raise file_error(f"{option} {spec}", exc) from None


def path_given_once(value: Path | None, name: str, old: Path | None, old_name: str, what: str) -> Path:
    """The path of option ``name`` or of its old spelling ``old_name`` (given once, or the same twice); a
    one-line error naming ``what`` is missing or given twice."""
    if value is not None and old is not None and value != old:
        raise UserInputError(f"{name} {value} and {old_name} {old}: give {what} once")
    chosen = value if value is not None else old
    if chosen is None:
        raise UserInputError(f"{name}: missing ({what})")
    return chosen


def check_writable(path: Path, option: str) -> None:
    """Fail before any compute if ``path`` cannot be written (a folder, a missing or read-only folder)."""
    if path.is_dir():
        raise UserInputError(f"{option} {path}: is a folder, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)) \
            or not can_create_in(folder):
        raise UserInputError(f"{option} {path}: not writable")


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permissions do not tell for root, read-only mounts,
    /proc, ...). The outputs are written as a temporary file renamed into place, so the folder must take one."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".relaxtune-probe-"):
            return True
    except OSError:
        return False


def use_threads(threads: int) -> int:
    """Set torch's CPU threads: ``threads``, or with 0 the cores this process may use, shared evenly by the
    processes torchrun started on this machine (``LOCAL_WORLD_SIZE``). Returns the number."""
    if threads > 0:
        n = threads
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    return n
