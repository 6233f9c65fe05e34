"""Add the DFT stress of the relaxed (last) frame to fixed-cell reference relaxations.

A fixed-cell relaxation records energies and forces, which say nothing about the pressure of the host: a model
fine-tuned on them alone can drift in its equation of state (docs/results.md: bulk Si +3.5% in volume). One
more SCF at the relaxed structure gives its stress; the trainer's frame loss uses it (``--stress-weight``).

    OMP_NUM_THREADS=1 python scripts/add_final_stress.py src/relaxtune/data/builtin/si-defects/*.extxyz \\
        --kpts gamma --skip-elements B,C,N

Resumable (files whose last frame has a stress are skipped) and atomic (each file is replaced in one step).
``--skip-elements``: at the reference 300 eV the stress of cells with first-row elements carries a Pulay error
of GPa (README, "DFT cutoff"), as large as what it is meant to pin, so such files are left without one.
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.units import GPa

from relaxtune.dft import GenerateSettings, make_calculator

ENERGY_TOLERANCE = 1e-3  # eV: the new SCF must reproduce the stored energy of the relaxed frame


def add_stress(path: Path, settings: GenerateSettings) -> str:
    """Recompute the last frame of ``path`` at ``settings`` and store its stress there. Returns a one-line log."""
    frames = read(path, ":")
    last = frames[-1]
    if "stress" in (last.calc.results if last.calc is not None else {}):
        return f"{path.name}: has a stress, skipped"
    atoms = last.copy()
    atoms.calc = make_calculator(atoms, settings)
    t0 = time.time()
    energy = atoms.get_potential_energy()
    stress = atoms.get_stress()
    stored = last.get_potential_energy()
    if abs(energy - stored) > ENERGY_TOLERANCE:
        return f"{path.name}: energy {energy:.5f} eV differs from the stored {stored:.5f} eV, not written"
    results = dict(last.calc.results)
    results["stress"] = stress
    info = dict(last.info)
    last.calc = SinglePointCalculator(last, **results)
    last.info = info
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, path)
    pressure = -float(np.mean(stress[:3])) / GPa
    return (f"{path.name}: pressure {pressure:+.3f} GPa, stress {np.round(stress / GPa, 3).tolist()} GPa, "
            f"dE {energy - stored:+.1e} eV, {time.time() - t0:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--ecut", type=float, default=300.0)
    parser.add_argument("--kpts", default="auto")
    parser.add_argument("--skip-elements", default="", help="comma-separated: files with any of them are skipped")
    args = parser.parse_args()
    skip = {e for e in args.skip_elements.split(",") if e}
    settings = GenerateSettings(calculator="gpaw", ecut=args.ecut, kpts=args.kpts)
    for path in args.files:
        if skip & set(read(path, 0).get_chemical_symbols()):
            print(f"{path.name}: contains one of {sorted(skip)}, skipped", flush=True)
            continue
        print(add_stress(path, settings), flush=True)


if __name__ == "__main__":
    main()
