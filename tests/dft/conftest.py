"""Small real inputs for the generation tests: rattled 8-atom Cu cells that EMT relaxes in a few steps."""

from __future__ import annotations

from typing import Callable

import pytest
from ase import Atoms
from ase.build import bulk

from relaxtune.data.builders import rattle


def rattled_cu_cells(n: int, stdev: float = 0.1) -> list[Atoms]:
    """``n`` rattled 2x1x1 Cu cells named ``cu_I`` (rattle seed I), in two groups ``g0`` / ``g1``."""
    out = []
    for i in range(n):
        atoms = rattle(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1)), stdev, seed=i)
        atoms.info.update(name=f"cu_{i}", group=f"g{i % 2}", seed=i)
        out.append(atoms)
    return out


@pytest.fixture
def cu_cells() -> Callable[..., list[Atoms]]:
    """:func:`rattled_cu_cells`, for tests that need several sets."""
    return rattled_cu_cells
