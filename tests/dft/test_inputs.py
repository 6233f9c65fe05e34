"""Input structures: every frame of an ASE-readable file, named after the file where it has no name."""

from __future__ import annotations

from ase.io import write

from relaxtune.dft import read_structures


def test_read_structures_names_unnamed_frames(tmp_path, cu_cells):
    path = tmp_path / "mine.extxyz"
    frames = cu_cells(3)
    del frames[1].info["name"]
    write(path, frames)
    assert [a.info["name"] for a in read_structures(path)] == ["cu_0", "mine_1", "cu_2"]
