"""Quantum ESPRESSO (``pw.x``) through ASE: PBE pseudopotentials, Fermi-Dirac 0.05 eV, forces and stress."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ase import Atoms
from ase.calculators.calculator import Calculator, kpts2sizeandoffsets

from relaxtune.dft.kpoints import kpoints_for
from relaxtune.dft.pseudopotentials import RY, choose_pseudopotentials, pseudo_dir_of, upf_header
from relaxtune.dft.settings import GenerateError, GenerateSettings


def espresso_command() -> str:
    """The ``pw.x`` command line: ``$ESPRESSO_COMMAND`` (e.g. with ``mpirun``), else ``pw.x``."""
    return os.environ.get("ESPRESSO_COMMAND", "pw.x")


def make_espresso(atoms: Atoms, settings: GenerateSettings, directory: Path | None) -> Calculator:
    """A ``pw.x`` calculator for one structure, writing its files in ``directory`` (else the current folder)."""
    from ase.calculators.espresso import Espresso, EspressoProfile  # the profile API of ASE >= 3.23

    folder = pseudo_dir_of(settings)
    pseudos = choose_pseudopotentials(atoms.get_chemical_symbols(), settings)
    ultrasoft = any(upf_header(folder / f).get("pseudo_type", "NC").upper() not in ("NC", "SL")
                    for f in pseudos.values())
    ecutwfc = settings.ecut / RY
    kp = kpoints_for(atoms, settings.kpts)
    if isinstance(kp, dict):  # ASE's espresso writer mishandles a density dict: give it the mesh itself
        kp = tuple(int(n) for n in kpts2sizeandoffsets(atoms=atoms, density=kp["density"])[0])
    return Espresso(
        profile=EspressoProfile(command=espresso_command(), pseudo_dir=str(folder)), pseudopotentials=pseudos,
        directory=str(directory or "."),
        input_data={"control": {"calculation": "scf", "tprnfor": True, "tstress": True, "disk_io": "none"},
                    "system": {"ecutwfc": ecutwfc, "ecutrho": (8.0 if ultrasoft else 4.0) * ecutwfc,
                               "occupations": "smearing", "smearing": "fd", "degauss": 0.05 / RY},
                    "electrons": {"conv_thr": 1e-9 * len(atoms), "mixing_beta": 0.5}},
        kpts=None if kp == (1, 1, 1) else kp, koffset=(0, 0, 0),  # offset 0: Γ-centred, as GPAW's gamma=True
    )


def check_espresso(symbols: list[str], settings: GenerateSettings) -> None:
    """``pw.x`` is on the PATH and every element has a PBE pseudopotential (``GenerateError`` otherwise)."""
    command = espresso_command().split()[0]
    if shutil.which(command) is None:
        raise GenerateError(f"calculator espresso: {command} not found (apt-get install quantum-espresso "
                            "quantum-espresso-data, or set $ESPRESSO_COMMAND)")
    choose_pseudopotentials(symbols, settings)
