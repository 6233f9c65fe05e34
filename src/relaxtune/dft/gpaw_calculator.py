"""GPAW at the shipped datasets' level: PBE, plane waves, Fermi-Dirac 0.05 eV (an optional dependency)."""

from __future__ import annotations

from ase import Atoms
from ase.calculators.calculator import Calculator

from relaxtune.dft.kpoints import kpoints_for
from relaxtune.dft.settings import GenerateError, GenerateSettings

#: GPAW symmetry for a cell relaxation: no point group (the cell and the atoms move), but k and -k stay
#: equivalent (time reversal: no magnetism or spin-orbit here), which halves the k-points at the same results.
NO_POINT_GROUP = {"point_group": False, "time_reversal": True}


def make_gpaw(atoms: Atoms, settings: GenerateSettings) -> Calculator:
    """A GPAW calculator for one structure (full symmetry for fixed cells, :data:`NO_POINT_GROUP` otherwise)."""
    from gpaw import GPAW, PW, FermiDirac  # optional dependency

    return GPAW(mode=PW(settings.ecut), xc="PBE", occupations=FermiDirac(0.05),
                convergence={"energy": 1e-5, "density": 1e-4}, kpts=kpoints_for(atoms, settings.kpts),
                txt=None, symmetry=NO_POINT_GROUP if settings.relax_cell else {})


def check_gpaw(symbols: list[str]) -> None:
    """GPAW is installed and has a PBE PAW setup for every element (``GenerateError`` otherwise)."""
    try:
        import gpaw  # noqa: F401  (optional dependency)
    except ImportError:
        raise GenerateError("calculator gpaw: GPAW is not installed (run scripts/install_gpaw.sh)") from None
    from gpaw.setup_data import search_for_file

    for symbol in symbols:
        try:
            search_for_file(f"{symbol}.PBE")
        except Exception:
            raise GenerateError(f"calculator gpaw: no PBE PAW setup for {symbol} (pip install gpaw-data, or "
                                "set GPAW_SETUP_PATH)") from None
