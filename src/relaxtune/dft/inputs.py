"""Input structures of a run, from any ASE-readable file, each with the name its output file takes."""

from __future__ import annotations

from pathlib import Path

from ase import Atoms

from relaxtune.data import structures
from relaxtune.dft.settings import GenerateError


def read_structures(path: Path | str) -> list[Atoms]:
    """Input structures for ``generate`` from any ASE-readable file (all frames, checked as
    ``relaxtune.data.structures.read_structures`` checks them).

    Names: ``info['name']`` where present, else ``STEM_INDEX`` (``STEM`` for a single structure). Other
    ``info`` keys (``group`` above all: what splits are made by) are copied into the output header.
    """
    path = Path(path)
    try:
        frames = structures.read_structures(path)
    except structures.StructureFileError as exc:
        cause = exc.__cause__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0] if cause is not None else ""
        raise GenerateError(f"{exc}: {reason}" if reason else str(exc)) from None
    stem = path.name.split(".")[0]
    for i, atoms in enumerate(frames):
        atoms.calc = None
        if "name" not in atoms.info:
            atoms.info["name"] = stem if len(frames) == 1 else f"{stem}_{i}"
    return frames
