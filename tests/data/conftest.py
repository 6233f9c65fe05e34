"""Real small inputs for the data tests: EMT relaxations made with ASE, real QE outputs, the shipped files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from ase.optimize import BFGS

from relaxtune.data.builders import rattle

FILES = Path(__file__).parent / "files"
BUILTIN_SI = Path(__file__).resolve().parents[2] / "src" / "relaxtune" / "data" / "builtin" / "si-defects"
ASE_VASP = Path(__import__("ase").__file__).parent / "test" / "testdata" / "vasp"


def emt_relaxation(seed: int = 0, name: str | None = None, group: str | None = None, stdev: float = 0.08):
    """A real EMT relaxation of a rattled 4-atom Cu cell: list of frames with energies and forces."""
    atoms = rattle(bulk("Cu", "fcc", a=3.61, cubic=True), stdev, seed)
    atoms.calc = EMT()
    frames = []

    def keep():
        from ase.calculators.singlepoint import SinglePointCalculator

        f = atoms.copy()
        f.calc = SinglePointCalculator(f, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(f)

    opt = BFGS(atoms, logfile=None)
    opt.attach(keep)
    opt.run(fmax=0.01, steps=100)
    if name:
        frames[0].info["name"] = name
    if group:
        frames[0].info["group"] = group
    return frames


@pytest.fixture
def emt_file(tmp_path):
    path = tmp_path / "cu_relax.extxyz"
    write(path, emt_relaxation(seed=1), format="extxyz")
    return path


@pytest.fixture
def si_seed_file(tmp_path):
    """A copy of a shipped real-DFT Si-defect relaxation (GPAW PBE)."""
    src = BUILTIN_SI / "vacancy_1.extxyz"
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


@pytest.fixture
def make_relaxation():
    """The EMT relaxation maker, for tests that need several."""
    return emt_relaxation
