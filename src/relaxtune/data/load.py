"""One entry point for every way of naming a dataset: ``load_pairs(spec)``.

A spec is a file, a directory, ``INITIAL:FINAL``, ``DIR:SPLIT``, ``builtin:NAME`` or ``builtin:NAME:SPLIT``.
This module sits above both the file readers (``relaxtune.data.pairs``) and the shipped datasets
(``relaxtune.data.registry``), so that neither needs the other's dispatcher.
"""

from __future__ import annotations

from pathlib import Path

from relaxtune.data.pairs import (
    MAX_PLAUSIBLE_DISPLACEMENT,
    DataError,
    RelaxationPair,
    read_directory,
    read_initial_final,
    read_splits_file,
    read_trajectory_pairs,
)
from relaxtune.data.registry import load_builtin, parse_builtin


def _check_unique(pairs: list[RelaxationPair]) -> None:
    """Names are file names downstream: two pairs may not share one."""
    seen: dict[str, str] = {}
    for p in pairs:
        if p.name in seen:
            raise DataError(f"{p.source}: name: structure name {p.name!r} also used in {seen[p.name]} "
                            "(names must be unique)")
        seen[p.name] = p.source


def load_pairs(spec: str | Path, relax_cell: bool | None = None,
               max_displacement: float | None = MAX_PLAUSIBLE_DISPLACEMENT) -> list[RelaxationPair]:
    """Relaxation pairs from a file, a directory, ``INITIAL:FINAL``, ``builtin:NAME`` or ``builtin:NAME:SPLIT``.

    ``DIR:SPLIT`` selects one split of a directory that has a ``splits.json``. ``relax_cell`` None detects
    cell relaxation from the files; True/False overrides it.
    """
    spec_str = str(spec)
    if spec_str.startswith("builtin:"):
        return load_builtin(spec_str[len("builtin:"):])
    path = Path(spec_str).expanduser()
    if path.is_dir():
        pairs = read_directory(path, relax_cell, max_displacement)
    elif path.is_file():
        pairs = read_trajectory_pairs(path, relax_cell, max_displacement)
    elif ":" in spec_str:
        directory_split = _directory_split(spec_str)
        if directory_split is not None:
            directory, split = directory_split
            splits = read_splits_file(directory / "splits.json")
            if split not in splits:
                raise DataError(f"{directory / 'splits.json'}: splits: no split {split!r} (have: {', '.join(splits)})")
            return [p for p in read_directory(directory, relax_cell, max_displacement) if p.split == split]
        left, right = spec_str.rsplit(":", 1)
        lpath, rpath = Path(left).expanduser(), Path(right).expanduser()
        for part in (lpath, rpath):
            if not part.is_file():
                raise DataError(f"{part}: file: not found (INITIAL:FINAL needs two existing files)")
        pairs = read_initial_final(lpath, rpath, relax_cell, max_displacement)
    else:
        raise DataError(f"{spec_str}: file: not found (expected a file, a directory, INITIAL:FINAL or builtin:NAME)")
    _check_unique(pairs)
    return pairs


def _directory_split(spec_str: str) -> tuple[Path, str] | None:
    """``DIR:SPLIT`` as (DIR, SPLIT) when DIR is a directory with a ``splits.json``, else None."""
    if ":" not in spec_str:
        return None
    left, split = spec_str.rsplit(":", 1)
    directory = Path(left).expanduser()
    return (directory, split) if directory.is_dir() and (directory / "splits.json").exists() else None


def dataset_of(spec: str | Path) -> str | None:
    """The dataset a spec selects from: ``builtin:NAME`` without its split, a file or directory (``DIR:SPLIT``
    without the split) as an absolute path; None for ``INITIAL:FINAL``. A run records it, so that its report
    compares on the same data's test split from any working directory."""
    spec_str = str(spec)
    if spec_str.startswith("builtin:"):
        return f"builtin:{parse_builtin(spec_str[len('builtin:'):])[0].name}"
    path = Path(spec_str).expanduser()
    if path.exists():
        return str(path.resolve())
    directory_split = _directory_split(spec_str)
    return str(directory_split[0].resolve()) if directory_split else None
