"""A whole run: check the names, skip finished structures, relax the rest in ``jobs`` single-threaded workers."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from ase import Atoms

from relaxtune.dft.calculators import make_calculator
from relaxtune.dft.output import pending
from relaxtune.dft.relaxation import CalculatorFactory, relax_one
from relaxtune.dft.settings import GenerateError, GenerateSettings

#: a structure name is a file name: letters, digits and _ . + - (not starting with a dot or a sign)
_FILE_SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+\-]*"


def _worker_init() -> None:
    """One thread per worker: the workers share the cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch  # optional here: only the sw and MODULE:CLASS calculators may load it

        torch.set_num_threads(1)
    except ImportError:
        pass


def generate(structures: list[Atoms], out_dir: Path | str, settings: GenerateSettings, jobs: int = 1,
             retry_failed: bool = False, on_result: Callable[[dict], None] | None = None,
             calculator_factory: CalculatorFactory = make_calculator) -> list[dict]:
    """Relax every structure not done yet, ``jobs`` single-threaded workers at a time.

    ``calculator_factory(atoms, settings[, directory=])`` makes the calculator; with ``jobs > 1`` it must be
    importable by name (a module-level function), as workers are fresh processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [a.info.get("name") for a in structures]
    if any(n is None for n in names) or len(set(names)) != len(names):
        raise GenerateError("every structure needs a unique info['name'] (its output file name)")
    bad = [n for n in names if not re.fullmatch(_FILE_SAFE_NAME, str(n))]
    if bad:
        raise GenerateError(f"structure name {bad[0]!r}: use letters, digits and _ . + - (it is a file name)")
    todo = pending(structures, out_dir, retry_failed, settings.level())
    try:
        return _run(todo, out_dir, settings, jobs, on_result, calculator_factory)
    finally:
        try:
            (out_dir / ".work").rmdir()  # only when empty: failed runs keep their scratch files
        except OSError:
            pass


def _run(todo: list[Atoms], out_dir: Path, settings: GenerateSettings, jobs: int,
         on_result: Callable[[dict], None] | None, calculator_factory: CalculatorFactory) -> list[dict]:
    results = []
    if jobs <= 1 or len(todo) <= 1:
        _worker_init()
        for atoms in todo:
            results.append(relax_one(atoms, out_dir, settings, calculator_factory))
            if on_result:
                on_result(results[-1])
        return results
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before they load BLAS
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = [pool.submit(relax_one, atoms, out_dir, settings, calculator_factory) for atoms in todo]
        for fut in as_completed(futures):
            results.append(fut.result())
            if on_result:
                on_result(results[-1])
    return results
