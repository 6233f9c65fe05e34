"""Atomic file writes: a temporary file in the target's folder, flushed and fsynced, then ``os.replace``d onto the
target, so that a reader (or a resumed run) sees the old file or the new one, never half of one; and durable
appends, for outputs that grow record by record (a kill loses at most the record being written). Every file
relaxtune writes as a job goes (checkpoints, metrics, JSON results, trajectories, splits) goes through here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable

import torch


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``; returns ``path``.
    The folder is created; on an error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def durable_append(text: str, path: str | Path) -> None:
    """Append ``text`` to ``path``, flushed and fsynced before returning."""
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
