"""Structures from any ASE-readable file, checked before any compute, with one-line errors that name the file,
the structure and the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read


class StructureFileError(ValueError):
    """A structure file that cannot be used; the message is one line. A reader's own exception, when the file
    could not be parsed at all, is the ``__cause__``."""


def read_structures(path: Path | str, index: str = ":") -> list[Atoms]:
    """The frames ``index`` of ``path`` (ASE's index syntax), each with atoms, finite positions and cell, and a
    non-singular cell when periodic."""
    path = Path(path)
    if not path.exists():
        raise StructureFileError(f"{path}: no such file")
    if path.is_dir():
        raise StructureFileError(f"{path}: is a folder, not a structure file")
    try:
        frames = read(str(path), index=index)
    except Exception as exc:  # ASE raises many kinds (UnknownFileTypeError, ValueError, StopIteration, ...)
        raise StructureFileError(f"{path}: cannot read structures") from exc
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise StructureFileError(f"{path}: no structures in the file")
    for i, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise StructureFileError(f"{path}: structure {i}: no atoms")
        if not np.isfinite(atoms.positions).all():
            atom = int(np.nonzero(~np.isfinite(atoms.positions).all(1))[0][0])
            raise StructureFileError(f"{path}: structure {i}: positions: non-finite coordinates (atom {atom})")
        cell = atoms.cell.array
        if not np.isfinite(cell).all():
            raise StructureFileError(f"{path}: structure {i}: cell: non-finite lattice vectors")
        if atoms.pbc.any():
            volume = abs(np.linalg.det(cell))
            if volume < 1e-6 * max(1.0, len(atoms)):
                raise StructureFileError(f"{path}: structure {i}: cell: singular (volume {volume:.3g} Å^3) for a "
                                         "periodic structure")
    return frames
