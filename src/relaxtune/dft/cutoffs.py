"""Plane-wave cutoffs a cell relaxation needs: too low a cutoff leaves a basis-set (Pulay) stress that shrinks
the cell, most for first-row elements."""

from __future__ import annotations

from ase import Atoms

from relaxtune.dft.settings import GenerateSettings

#: lowest plane-wave cutoff (eV) at which a cell relaxation with this element is trusted (GPAW PBE: the
#: pressure is then within a few GPa of its value at 900 eV); elements not listed are fine at 300 eV.
CELL_RELAX_MIN_ECUT = {"B": 700.0, "C": 500.0, "N": 700.0}


def cell_relax_min_ecut(atoms: Atoms) -> tuple[float, str | None]:
    """The lowest plane-wave cutoff (eV) at which a cell relaxation of ``atoms`` is trusted, and the element that
    sets it (None when no element of :data:`CELL_RELAX_MIN_ECUT` is present: 0 eV)."""
    needs = {el: CELL_RELAX_MIN_ECUT[el] for el in set(atoms.get_chemical_symbols()) if el in CELL_RELAX_MIN_ECUT}
    if not needs:
        return 0.0, None
    element = max(needs, key=needs.get)
    return needs[element], element


def cutoff_warning(structures: list[Atoms], settings: GenerateSettings) -> str | None:
    """A one-line warning when a plane-wave cell relaxation runs below :data:`CELL_RELAX_MIN_ECUT` for an
    element of one of ``structures`` (None when the cutoff suits them all)."""
    if not settings.relax_cell or settings.calculator not in ("gpaw", "espresso"):
        return None
    for atoms in structures:
        needed, element = cell_relax_min_ecut(atoms)
        if settings.ecut < needed:
            return (f"structure {atoms.info.get('name', '?')!r}: ecut {settings.ecut:g} eV is below "
                    f"{needed:g} eV, the lowest cutoff at which a cell relaxation with {element} is trusted "
                    "(basis-set stress shrinks the cell); raise --ecut")
    return None
