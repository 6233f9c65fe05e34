"""The output folder of a run, written so that a killed run loses at most one step.

``OUT/NAME.extxyz`` is a finished relaxation (every frame with energy, forces and, for cell relaxations,
stress; the first frame's header holds the settings and the outcome). ``OUT/.NAME.partial.extxyz`` holds the
frames of a relaxation in progress, ``OUT/NAME.failed.json`` why a structure failed. Every file is written
to a temporary name and renamed, so it is either whole or absent. Frames record their level of theory, so
files of another level are never mixed with a run's own.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from relaxtune.atomic import atomic_write, atomic_write_text


def finished_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.extxyz"


def failed_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.failed.json"


def partial_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.partial.extxyz"


def snapshot(atoms: Atoms, with_stress: bool) -> Atoms:
    """A copy of the current structure with its results frozen in a single-point calculator."""
    frame = atoms.copy()
    frame.info = {}
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if with_stress:
        results["stress"] = atoms.get_stress()
    frame.calc = SinglePointCalculator(frame, **results)
    return frame


def write_frames(path: Path, frames: list[Atoms]) -> None:
    """Write an extxyz trajectory atomically."""
    atomic_write(path, lambda fh: write(fh, frames, format="extxyz"))


def write_failure(out_dir: Path, name: str, record: dict) -> None:
    """Write ``NAME.failed.json`` atomically."""
    atomic_write_text(json.dumps(record, indent=1), failed_path(out_dir, name))


def same_structure(a: Atoms, b: Atoms, tol: float = 1e-6) -> bool:
    """Same atoms in the same order at the same positions and cell (to ``tol`` Å)."""
    return (len(a) == len(b) and np.array_equal(a.numbers, b.numbers)
            and np.allclose(a.positions, b.positions, atol=tol, rtol=0)
            and np.allclose(a.cell.array, b.cell.array, atol=tol, rtol=0))


def resume_frames(atoms: Atoms, out_dir: Path, level: str | None = None) -> list[Atoms]:
    """Frames of an interrupted relaxation of ``atoms`` (empty if none, or if they belong to something else or,
    when ``level`` is given and the frames record one, to another level of theory; such a file is deleted)."""
    path = partial_path(out_dir, atoms.info["name"])
    if not path.exists():
        return []
    try:
        frames = read(path, index=":", format="extxyz")
    except Exception:  # a torn file: start again
        frames = []
    if not frames or not same_structure(frames[0], atoms, tol=1e-5):
        path.unlink(missing_ok=True)
        return []
    recorded = frames[0].info.get("level")
    if level is not None and recorded is not None and recorded != level:
        path.unlink(missing_ok=True)
        return []
    return frames


def pending(structures: list[Atoms], out_dir: Path, retry_failed: bool = False,
            level: str | None = None) -> list[Atoms]:
    """Structures with no finished file (and, unless ``retry_failed``, no failure record).

    A finished file whose first frame is not the given structure (same name, different input) or, when
    ``level`` is given, that records another level of theory, is kept and skipped with a warning: delete it to
    regenerate.
    """
    todo = []
    for atoms in structures:
        name = atoms.info["name"]
        done = finished_path(out_dir, name)
        if done.exists():
            try:
                first = read(done, index=0, format="extxyz")
                if not same_structure(first, atoms, tol=1e-5):
                    warnings.warn(f"{done}: exists but its initial structure differs from the input {name!r}; "
                                  "kept (delete it to regenerate)", stacklevel=2)
                elif level is not None and first.info.get("level", level) != level:
                    warnings.warn(f"{done}: exists at level {first.info['level']!r}, not {level!r}; kept (delete "
                                  "it to regenerate)", stacklevel=2)
            except Exception:
                warnings.warn(f"{done}: exists but cannot be read; kept (delete it to regenerate)", stacklevel=2)
            continue
        if failed_path(out_dir, name).exists() and not retry_failed:
            continue
        todo.append(atoms)
    return todo
