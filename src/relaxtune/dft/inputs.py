"""Input structures of a run, from any ASE-readable file, each with the name its output file takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read

from relaxtune.dft.settings import GenerateError

def read_structures(path: Path | str) -> list[Atoms]:
    """Input structures for ``generate`` from any ASE-readable file (all frames).

    Names: ``info['name']`` where present, else ``STEM_INDEX`` (``STEM`` for a single structure). Other
    ``info`` keys (``group`` above all: what splits are made by) are copied into the output header.
    """
    path = Path(path)
    try:
        frames = read(path, index=":")
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GenerateError(f"{path}: cannot read structures: {first_line}") from None
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise GenerateError(f"{path}: no structures")
    stem = path.name.split(".")[0]
    for i, atoms in enumerate(frames):
        if not np.isfinite(atoms.positions).all():
            raise GenerateError(f"{path}: structure {i}: positions: NaN or infinite coordinates")
        atoms.calc = None
        if "name" not in atoms.info:
            atoms.info["name"] = stem if len(frames) == 1 else f"{stem}_{i}"
    return frames
