"""Structure files are checked before any compute: one-line errors naming file, structure and field."""

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write

from relaxtune.data.structures import StructureFileError, read_structures


def test_frames_are_read_with_ase_index_syntax(tmp_path):
    path = tmp_path / "three.extxyz"
    write(path, [bulk("Si", a=5.43 + 0.01 * k) for k in range(3)])
    assert len(read_structures(path)) == 3
    assert [round(a.cell[0, 1], 4) for a in read_structures(path, "1:")] == [2.72, 2.725]


@pytest.mark.parametrize("spoil, message", [
    (lambda a: a.positions.__setitem__((1, 2), np.nan), "structure 1: positions: non-finite coordinates (atom 1)"),
    (lambda a: a.set_cell(np.zeros((3, 3))), "structure 1: cell: singular"),
])
def test_a_bad_structure_is_named(tmp_path, spoil, message):
    frames = [bulk("Si"), bulk("Si")]
    spoil(frames[1])
    path = tmp_path / "bad.extxyz"
    write(path, frames)
    with pytest.raises(StructureFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_structures(path)


def test_an_unreadable_file_keeps_the_reader_error_as_its_cause(tmp_path):
    path = tmp_path / "text.xyz"
    path.write_text("not a structure\n")
    with pytest.raises(StructureFileError, match="text.xyz: cannot read structures$") as caught:
        read_structures(path)
    assert caught.value.__cause__ is not None
    with pytest.raises(StructureFileError, match="is a folder"):
        read_structures(tmp_path)
