"""Checks before hours of DFT: fail with one line on what would make every structure fail."""

from __future__ import annotations

import warnings

from ase import Atoms

from relaxtune.dft.calculators import check_calculator
from relaxtune.dft.cutoffs import cutoff_warning
from relaxtune.dft.kpoints import kpoints_for
from relaxtune.dft.settings import GenerateSettings


def preflight(structures: list[Atoms], settings: GenerateSettings) -> None:
    """Raise ``GenerateError`` on a setup problem (calculator, data files, k-points); warn on a cutoff too low
    for a cell relaxation."""
    warning = cutoff_warning(structures, settings)
    if warning:
        warnings.warn(warning, stacklevel=2)
    kpoints_for(Atoms("H"), settings.kpts)  # raises on a malformed spec
    check_calculator(sorted({s for a in structures for s in a.get_chemical_symbols()}), settings)
