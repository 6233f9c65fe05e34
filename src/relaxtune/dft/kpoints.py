"""The k-point sampling of one structure from the ``kpts`` setting (auto, gamma or density:X)."""

from __future__ import annotations

from ase import Atoms

from relaxtune.dft.settings import GenerateError

#: k-point density (Å) of ``auto`` for cells under 32 atoms; larger cells sample Γ only.
AUTO_DENSITY = 3.5
AUTO_GAMMA_ONLY_ATOMS = 32


def kpoints_for(atoms: Atoms, spec: str) -> tuple[int, int, int] | dict:
    """``(1, 1, 1)`` for Γ only, else ASE's ``{'density': X, 'gamma': True}`` (a Γ-centred mesh)."""
    if spec == "gamma" or (spec == "auto" and len(atoms) >= AUTO_GAMMA_ONLY_ATOMS):
        return (1, 1, 1)
    if spec == "auto":
        density = AUTO_DENSITY
    elif spec.startswith("density:"):
        density = float(spec.split(":", 1)[1])
    else:
        raise GenerateError(f"kpts: {spec!r} is not auto, gamma or density:X")
    return {"density": density, "gamma": True}
