"""Reference relaxations with any ASE calculator: one extxyz trajectory per structure, resumable.

Each finished structure is ``OUT/NAME.extxyz``: every frame of the relaxation with energy, forces (and
stress), the first frame = the initial structure, the last = the relaxed one; the first frame's header holds
the settings and the outcome. Files are written atomically, so a killed run leaves either a whole file or
none: on restart finished structures are skipped and interrupted ones start again. A structure that fails
(SCF not converging, a crash) gets ``OUT/NAME.failed.json`` with the reason, and the others go on.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io import write
from ase.optimize import BFGS


@dataclass(frozen=True)
class GenerateSettings:
    calculator: str = "gpaw"  # gpaw | espresso | emt | sw | MODULE:CLASS
    fmax: float = 0.02  # eV/Å
    relax_cell: bool = False
    max_steps: int = 300
    ecut: float = 300.0  # eV, plane-wave cutoff (DFT calculators)
    kpts: str = "auto"  # auto: Γ for ≥ 32 atoms, else k-point density 3.5 Å (gamma-centred); gamma; density:X

    def level(self) -> str:
        """A one-line description of the level of theory, written into every file."""
        if self.calculator == "gpaw":
            import gpaw

            return f"GPAW {gpaw.__version__} PBE PW{self.ecut:g} kpts={self.kpts} FD0.05"
        if self.calculator == "espresso":
            return f"QuantumESPRESSO PBE ecutwfc={self.ecut:g}eV kpts={self.kpts}"
        return self.calculator


def _kpts(atoms: Atoms, spec: str):
    if spec == "gamma" or (spec == "auto" and len(atoms) >= 32):
        return (1, 1, 1)
    density = 3.5 if spec == "auto" else float(spec.split(":", 1)[1])
    return {"density": density, "gamma": True}


def make_calculator(atoms: Atoms, settings: GenerateSettings) -> Calculator:
    """An ASE calculator for one structure at the chosen level of theory."""
    name = settings.calculator
    if name == "gpaw":
        from gpaw import GPAW, PW, FermiDirac

        return GPAW(mode=PW(settings.ecut), xc="PBE", occupations=FermiDirac(0.05),
                    convergence={"energy": 1e-5, "density": 1e-4}, kpts=_kpts(atoms, settings.kpts),
                    txt=None, symmetry="off" if settings.relax_cell else {})
    if name == "espresso":
        from ase.calculators.espresso import Espresso, EspressoProfile

        pseudo_dir = os.environ.get("ESPRESSO_PSEUDO", "/usr/share/espresso/pseudo")
        available = {p.name.split(".")[0].split("_")[0].lower(): p.name for p in Path(pseudo_dir).glob("*.UPF")}
        pseudos = {s: available[s.lower()] for s in set(atoms.get_chemical_symbols())}
        kp = _kpts(atoms, settings.kpts)
        return Espresso(
            profile=EspressoProfile(command="pw.x", pseudo_dir=pseudo_dir), pseudopotentials=pseudos,
            input_data={"control": {"tprnfor": True, "tstress": True},
                        "system": {"ecutwfc": settings.ecut / 13.605693, "occupations": "smearing",
                                   "smearing": "fd", "degauss": 0.05 / 13.605693},
                        "electrons": {"conv_thr": 1e-7}},
            kpts=None if kp == (1, 1, 1) else kp, koffset=(0, 0, 0),
        )
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "sw":
        from relaxtune.calculator import RelaxtuneCalculator
        from relaxtune.potentials.classical import StillingerWeber

        return RelaxtuneCalculator(StillingerWeber().double())
    module, _, cls = name.partition(":")
    if not cls:
        raise ValueError(f"unknown calculator {name!r}: use gpaw, espresso, emt, sw or MODULE:CLASS")
    return getattr(importlib.import_module(module), cls)()


def _frame(atoms: Atoms, with_stress: bool) -> Atoms:
    """A copy of the current structure with its results frozen in a single-point calculator."""
    frame = atoms.copy()
    frame.info = {}
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if with_stress:
        results["stress"] = atoms.get_stress()
    frame.calc = SinglePointCalculator(frame, **results)
    return frame


def _atomic_write(path: Path, frames: list[Atoms]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, path)


def relax_one(atoms: Atoms, out_dir: Path, settings: GenerateSettings,
              calculator_factory: Callable[[Atoms, GenerateSettings], Calculator] = make_calculator) -> dict:
    """Relax one structure, write its trajectory file, return a summary (or the failure reason)."""
    name = atoms.info["name"]
    start = time.time()
    work = atoms.copy()
    work.info = {}
    frames: list[Atoms] = []
    try:
        work.calc = calculator_factory(work, settings)
        target = FrechetCellFilter(work) if settings.relax_cell else work
        opt = BFGS(target, logfile=None, maxstep=0.2)
        opt.attach(lambda: frames.append(_frame(work, settings.relax_cell)))
        converged = bool(opt.run(fmax=settings.fmax, steps=settings.max_steps))
    except Exception as exc:  # SCF failure, calculator crash: record and go on
        reason = f"{type(exc).__name__}: {exc}".strip()
        record = {"name": name, "reason": reason, "traceback": traceback.format_exc(limit=5),
                  "settings": asdict(settings), "seconds": round(time.time() - start, 1)}
        tmp = out_dir / f".{name}.failed.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_dir / f"{name}.failed.json")
        return {"name": name, "status": "failed", "reason": reason}
    header = {k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, bool, np.integer, np.floating))}
    forces = frames[-1].get_forces()
    header.update(
        converged=converged, n_steps=len(frames) - 1, fmax_target=settings.fmax,
        fmax_final=float(np.linalg.norm(forces, axis=1).max()), relax_cell=settings.relax_cell,
        level=settings.level(), calculator=settings.calculator, seconds=round(time.time() - start, 1),
    )
    frames[0].info.update(header)
    _atomic_write(out_dir / f"{name}.extxyz", frames)
    return {"name": name, "status": "converged" if converged else "not_converged", "steps": len(frames) - 1,
            "seconds": header["seconds"]}


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def pending(structures: list[Atoms], out_dir: Path, retry_failed: bool = False) -> list[Atoms]:
    """Structures with no finished file (and, unless ``retry_failed``, no failure record)."""
    todo = []
    for atoms in structures:
        name = atoms.info["name"]
        if (out_dir / f"{name}.extxyz").exists():
            continue
        if (out_dir / f"{name}.failed.json").exists() and not retry_failed:
            continue
        todo.append(atoms)
    return todo


def generate(structures: list[Atoms], out_dir: Path | str, settings: GenerateSettings, jobs: int = 1,
             retry_failed: bool = False, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Relax every structure not done yet, ``jobs`` single-threaded workers at a time."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [a.info.get("name") for a in structures]
    if any(n is None for n in names) or len(set(names)) != len(names):
        raise ValueError("every structure needs a unique info['name'] (its output file name)")
    todo = pending(structures, out_dir, retry_failed)
    results = []
    if jobs <= 1:
        _worker_init()
        for atoms in todo:
            results.append(relax_one(atoms, out_dir, settings))
            if on_result:
                on_result(results[-1])
        return results
    import multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before they load BLAS
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = [pool.submit(relax_one, atoms, out_dir, settings) for atoms in todo]
        for fut in as_completed(futures):
            results.append(fut.result())
            if on_result:
                on_result(results[-1])
    return results
