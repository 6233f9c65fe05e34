"""One structure's relaxation: BFGS (the cell too, if asked), every step saved, resumed after an interruption."""

from __future__ import annotations

import inspect
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from relaxtune.dft.calculators import make_calculator
from relaxtune.dft.output import (
    failed_path,
    finished_path,
    partial_path,
    resume_frames,
    snapshot,
    write_failure,
    write_frames,
)
from relaxtune.dft.pseudopotentials import choose_pseudopotentials
from relaxtune.dft.settings import GenerateSettings

CalculatorFactory = Callable[..., Calculator]


def _call_factory(factory: CalculatorFactory, atoms: Atoms, settings: GenerateSettings,
                  directory: Path) -> Calculator:
    """``factory(atoms, settings, directory=...)``, or without ``directory`` for factories that take none."""
    try:
        accepts_dir = "directory" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_dir = False
    return factory(atoms, settings, directory=directory) if accepts_dir else factory(atoms, settings)


def relax_one(atoms: Atoms, out_dir: Path, settings: GenerateSettings,
              calculator_factory: CalculatorFactory = make_calculator) -> dict:
    """Relax one structure, write its trajectory file, return a summary (or the failure reason)."""
    out_dir = Path(out_dir)
    name = atoms.info["name"]
    start = time.time()
    work = atoms.copy()
    work.info = {}
    work.calc = None
    previous = resume_frames(atoms, out_dir, settings.level())
    if previous:  # continue from the last finished step; that step is recomputed (and recorded) first
        work.positions = previous[-1].positions
        work.cell = previous[-1].cell
        previous = previous[:-1]
    frames: list[Atoms] = list(previous)
    partial = partial_path(out_dir, name)
    scratch = out_dir / ".work" / name

    def record() -> None:
        frames.append(snapshot(work, settings.relax_cell))
        frames[0].info["level"] = settings.level()  # a resume at another level starts again
        write_frames(partial, frames)

    try:
        scratch.mkdir(parents=True, exist_ok=True)
        work.calc = _call_factory(calculator_factory, work, settings, scratch)
        target = FrechetCellFilter(work) if settings.relax_cell else work
        opt = BFGS(target, logfile=None, maxstep=0.2)
        opt.attach(record)
        steps_left = max(settings.max_steps - max(len(previous), 0), 0)
        converged = bool(opt.run(fmax=settings.fmax, steps=steps_left))
    except Exception as exc:  # SCF failure, calculator crash: record and go on
        reason = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0][:500]
        failure = {"name": name, "reason": reason, "traceback": traceback.format_exc(limit=5),
                   "settings": asdict(settings), "n_frames": len(frames), "seconds": round(time.time() - start, 1)}
        if scratch.is_dir() and any(scratch.iterdir()):
            failure["scratch"] = str(scratch)  # the DFT code's own input/output, kept for diagnosis
        write_failure(out_dir, name, failure)
        partial.unlink(missing_ok=True)
        return {"name": name, "status": "failed", "reason": reason, "seconds": failure["seconds"]}
    header = {k: v for k, v in atoms.info.items()
              if isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_))}
    forces = frames[-1].get_forces()
    header.update(
        converged=converged, n_steps=len(frames) - 1, fmax_target=settings.fmax,
        fmax_final=float(np.linalg.norm(forces, axis=1).max()), relax_cell=settings.relax_cell,
        level=settings.level(), calculator=settings.calculator, seconds=round(time.time() - start, 1),
    )
    if settings.calculator == "espresso":
        pseudos = choose_pseudopotentials(atoms.get_chemical_symbols(), settings)
        header["pseudopotentials"] = ",".join(f"{k}={v}" for k, v in pseudos.items())
    if previous:
        header["resumed_at_step"] = len(previous)
    frames[0].info.update(header)
    write_frames(finished_path(out_dir, name), frames)
    partial.unlink(missing_ok=True)
    failed_path(out_dir, name).unlink(missing_ok=True)  # a retried failure that now worked
    shutil.rmtree(scratch, ignore_errors=True)
    return {"name": name, "status": "converged" if converged else "not_converged", "steps": len(frames) - 1,
            "seconds": header["seconds"], **({"resumed_at_step": len(previous)} if previous else {})}
