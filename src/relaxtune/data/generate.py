"""Reference relaxations with any ASE calculator: one extxyz trajectory per structure, resumable.

Each finished structure is ``OUT/NAME.extxyz``: every frame of the relaxation with energy, forces (and
stress), the first frame = the initial structure, the last = the relaxed one; the first frame's header holds
the settings and the outcome. Files are written atomically, so a killed run leaves either a whole file or
none. While a structure relaxes, its frames so far are kept in ``OUT/.NAME.partial.extxyz`` (rewritten
atomically after every step): a run that is cut off continues from the last finished step instead of
starting again (a partial file that does not belong to the structure is discarded and it restarts cleanly).
Finished structures are skipped. A structure that fails (SCF not converging, a crash) gets
``OUT/NAME.failed.json`` with the reason, and the others go on.

A plane-wave cutoff that suits fixed-cell relaxations of Si can be far too low for a cell relaxation with
first-row elements: the basis-set (Pulay) stress then shrinks the cell. Measured with GPAW PBE at the
experimental lattice constant, k density 3.5: c-BN -129 GPa at 300 eV, -29 at 500, -1 at 700; diamond -51 GPa
at 300, +0.4 at 500; zb-GaN -48 at 300, +12 at 700, +14 at 900; Si, Ge, AlP, GaAs change < 0.2 GPa from 300 to
500 eV. :func:`preflight` warns when a cell relaxation's cutoff is below :data:`CELL_RELAX_MIN_ECUT`.
Finished files and in-progress frames record the level of theory; a run at another level warns and keeps a
finished file, and restarts an in-progress one.

Calculators: ``gpaw`` (the reference level, DESIGN.md), ``espresso`` (Quantum ESPRESSO ``pw.x`` with PBE
pseudopotentials picked from ``pseudo_dir``), ``emt`` and ``sw`` (fast, for tests), or ``MODULE:CLASS``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import BFGS

RY = 13.605693122994  # eV
DEFAULT_PSEUDO_DIR = "/usr/share/espresso/pseudo"  # Debian/Ubuntu quantum-espresso-data


#: lowest plane-wave cutoff (eV) at which a cell relaxation with this element is trusted (pressure within a few
#: GPa of the 900 eV value, GPAW PBE; module docstring).
CELL_RELAX_MIN_ECUT = {"B": 700.0, "C": 500.0, "N": 700.0}


#: GPAW symmetry for a cell relaxation: no point group (the cell and the atoms move), but k and -k stay
#: equivalent (time reversal: no magnetism or spin-orbit here), which halves the k-points. Measured on the rattled
#: AlP_0 start: 197 instead of 392 k-points, 20 s instead of 39 s, same energy (1e-6 eV), forces and stress.
NO_POINT_GROUP = {"point_group": False, "time_reversal": True}


class GenerateError(ValueError):
    """A setup problem found before any structure is relaxed (calculator missing, no pseudopotential...)."""


@dataclass(frozen=True)
class GenerateSettings:
    calculator: str = "gpaw"  # gpaw | espresso | emt | sw | MODULE:CLASS
    fmax: float = 0.02  # eV/Å
    relax_cell: bool = False
    max_steps: int = 300
    ecut: float = 300.0  # eV, plane-wave cutoff (DFT calculators)
    kpts: str = "auto"  # auto: Γ for ≥ 32 atoms, else k-point density 3.5 Å (gamma-centred); gamma; density:X
    pseudo_dir: str = ""  # espresso: UPF folder ("" = $ESPRESSO_PSEUDO or /usr/share/espresso/pseudo)
    pseudopotentials: str = ""  # espresso: "Si=Si.pbe-rrkj.UPF,C=..." to override the automatic PBE choice

    def level(self) -> str:
        """A one-line description of the level of theory, written into every file."""
        if self.calculator == "gpaw":
            import gpaw

            return f"GPAW {gpaw.__version__} PBE PW{self.ecut:g} kpts={self.kpts} FD0.05"
        if self.calculator == "espresso":
            return f"QuantumESPRESSO PBE ecutwfc={self.ecut:g}eV kpts={self.kpts} FD0.05"
        return self.calculator


def _kpts(atoms: Atoms, spec: str):
    if spec == "gamma" or (spec == "auto" and len(atoms) >= 32):
        return (1, 1, 1)
    if spec == "auto":
        density = 3.5
    elif spec.startswith("density:"):
        density = float(spec.split(":", 1)[1])
    else:
        raise GenerateError(f"kpts: {spec!r} is not auto, gamma or density:X")
    return {"density": density, "gamma": True}


# ------------------------------------------------------------------------------------ Quantum ESPRESSO


def upf_header(path: Path | str) -> dict:
    """Element, functional, pseudopotential type and suggested cutoffs (Ry) from a UPF v1 or v2 header."""
    path = Path(path)
    with open(path, errors="replace") as fh:
        text = fh.read(60000)
    out: dict = {"file": path.name}
    m = re.search(r"<PP_HEADER(.*?)(/>|>)", text, re.S)
    attrs = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m.group(1))) if m else {}
    if attrs:  # UPF v2
        out["element"] = attrs.get("element", "").strip()
        out["functional"] = attrs.get("functional", "").strip()
        out["pseudo_type"] = attrs.get("pseudo_type", "").strip()
        for key in ("wfc_cutoff", "rho_cutoff"):
            try:
                out[key] = float(attrs[key])
            except (KeyError, ValueError):
                pass
        out["relativistic"] = attrs.get("relativistic", "").strip()
        out["has_so"] = attrs.get("has_so", "").strip().lower() in ("t", "true", ".true.")
    else:  # UPF v1: "value   label" lines
        block = text.split("<PP_HEADER>", 1)[1].split("</PP_HEADER>", 1)[0] if "<PP_HEADER>" in text else ""
        for line in block.splitlines():
            if "Element" in line:
                out["element"] = line.split()[0]
            elif "Exchange-Correlation" in line:
                out["functional"] = line.split("Exchange")[0].strip()
            elif re.search(r"\b(NC|US|PAW)\b", line) and "pseudo_type" not in out:
                out["pseudo_type"] = line.split()[0]
            elif "Suggested cutoff" in line:
                vals = line.split()
                try:
                    out["wfc_cutoff"], out["rho_cutoff"] = float(vals[0]), float(vals[1])
                except (ValueError, IndexError):
                    pass
    if not out.get("element"):
        out["element"] = re.split(r"[._\-]", path.name)[0]
    out["element"] = out["element"].strip().capitalize()
    return out


def is_pbe(functional: str) -> bool:
    """PBE in any of the UPF spellings: ``PBE``, ``SLA PW PBE PBE``, ``SLA PW PBX PBC``, ``SLA-PW-PBX-PBC``."""
    tokens = [t.upper() for t in re.split(r"[\s\-+]+", functional.strip()) if t]
    if tokens in (["PBE"], ["GGA-PBE"]):
        return True
    return len(tokens) >= 4 and tokens[:2] == ["SLA", "PW"] and tokens[2:4] in (["PBE", "PBE"], ["PBX", "PBC"])


def pseudo_dir_of(settings: GenerateSettings) -> Path:
    return Path(settings.pseudo_dir or os.environ.get("ESPRESSO_PSEUDO") or DEFAULT_PSEUDO_DIR)


def choose_pseudopotentials(symbols: list[str], settings: GenerateSettings) -> dict[str, str]:
    """A PBE pseudopotential file per element, from ``settings.pseudopotentials`` or the pseudo folder.

    Files are matched by the element and functional in their header (not their name: a folder such as
    Debian's holds LDA, PBEsol and fully relativistic files too). Preferred: scalar-relativistic, a
    suggested cutoff within ``settings.ecut``, then norm-conserving (cheapest), then name order.
    """
    folder = pseudo_dir_of(settings)
    chosen: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in settings.pseudopotentials.split(","))):
        el, _, fname = item.partition("=")
        if not fname or not (folder / fname).exists():
            raise GenerateError(f"pseudopotentials: {item!r}: expected ELEMENT=FILE with FILE in {folder}")
        chosen[el.strip()] = fname.strip()
    missing = sorted(set(symbols) - set(chosen))
    if not missing:
        return {s: chosen[s] for s in sorted(set(symbols))}
    if not folder.is_dir():
        raise GenerateError(f"pseudo_dir: {folder} does not exist (install quantum-espresso-data, or set "
                            "--pseudo-dir / $ESPRESSO_PSEUDO to a folder of UPF files)")
    candidates: dict[str, list[tuple]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".upf":
            continue
        try:
            head = upf_header(path)
        except OSError:
            continue
        if head["element"] not in missing or not is_pbe(head.get("functional", "")):
            continue
        full_rel = head.get("has_so") or head.get("relativistic") == "full" or ".rel-" in path.name
        too_hard = head.get("wfc_cutoff", 0.0) * RY > settings.ecut + 1e-6
        not_nc = head.get("pseudo_type", "").upper() not in ("NC", "SL")
        candidates.setdefault(head["element"], []).append((full_rel, too_hard, not_nc, path.name))
    lacking = [el for el in missing if el not in candidates]
    if lacking:
        raise GenerateError(f"pseudopotentials: no PBE pseudopotential for {', '.join(lacking)} in {folder} "
                            "(Debian's quantum-espresso-data has few elements; point --pseudo-dir at e.g. the SSSP "
                            "or pslibrary files, or pass --pseudo EL=FILE)")
    for el in missing:
        chosen[el] = sorted(candidates[el])[0][-1]
    return {s: chosen[s] for s in sorted(set(symbols))}


def _espresso(atoms: Atoms, settings: GenerateSettings, directory: Path | None) -> Calculator:
    from ase.calculators.espresso import Espresso, EspressoProfile

    folder = pseudo_dir_of(settings)
    pseudos = choose_pseudopotentials(atoms.get_chemical_symbols(), settings)
    ultrasoft = any(upf_header(folder / f).get("pseudo_type", "NC").upper() not in ("NC", "SL")
                    for f in pseudos.values())
    ecutwfc = settings.ecut / RY
    kp = _kpts(atoms, settings.kpts)
    if isinstance(kp, dict):  # ASE's espresso writer mishandles a density dict: give it the mesh itself
        from ase.calculators.calculator import kpts2sizeandoffsets

        kp = tuple(int(n) for n in kpts2sizeandoffsets(atoms=atoms, density=kp["density"])[0])
    command = os.environ.get("ESPRESSO_COMMAND", "pw.x")
    return Espresso(
        profile=EspressoProfile(command=command, pseudo_dir=str(folder)), pseudopotentials=pseudos,
        directory=str(directory or "."),
        input_data={"control": {"calculation": "scf", "tprnfor": True, "tstress": True, "disk_io": "none"},
                    "system": {"ecutwfc": ecutwfc, "ecutrho": (8.0 if ultrasoft else 4.0) * ecutwfc,
                               "occupations": "smearing", "smearing": "fd", "degauss": 0.05 / RY},
                    "electrons": {"conv_thr": 1e-9 * len(atoms), "mixing_beta": 0.5}},
        kpts=None if kp == (1, 1, 1) else kp, koffset=(0, 0, 0),  # offset 0: Γ-centred, as GPAW's gamma=True
    )


# ------------------------------------------------------------------------------------------ calculators


def make_calculator(atoms: Atoms, settings: GenerateSettings, directory: Path | None = None) -> Calculator:
    """An ASE calculator for one structure at the chosen level of theory (``directory``: scratch for codes
    that write files, one per structure so parallel workers never share one)."""
    name = settings.calculator
    if name == "gpaw":
        from gpaw import GPAW, PW, FermiDirac

        return GPAW(mode=PW(settings.ecut), xc="PBE", occupations=FermiDirac(0.05),
                    convergence={"energy": 1e-5, "density": 1e-4}, kpts=_kpts(atoms, settings.kpts),
                    txt=None, symmetry=NO_POINT_GROUP if settings.relax_cell else {})
    if name == "espresso":
        return _espresso(atoms, settings, directory)
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "sw":
        from relaxtune.calculator import RelaxtuneCalculator
        from relaxtune.potentials.classical import StillingerWeber

        return RelaxtuneCalculator(StillingerWeber().double())
    module, _, cls = name.partition(":")
    if not cls:
        raise GenerateError(f"unknown calculator {name!r}: use gpaw, espresso, emt, sw or MODULE:CLASS")
    return getattr(importlib.import_module(module), cls)()


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


def preflight(structures: list[Atoms], settings: GenerateSettings) -> None:
    """Fail early, with one line, on what would make every structure fail (before hours of DFT); warn on a
    cutoff too low for a cell relaxation."""
    name = settings.calculator
    warning = cutoff_warning(structures, settings)
    if warning:
        warnings.warn(warning, stacklevel=2)
    _kpts(Atoms("H"), settings.kpts)  # raises on a malformed spec
    if name == "gpaw":
        try:
            import gpaw  # noqa: F401
        except ImportError:
            raise GenerateError("calculator gpaw: GPAW is not installed (run scripts/install_gpaw.sh)") from None
        from gpaw.setup_data import search_for_file

        for symbol in sorted({s for a in structures for s in a.get_chemical_symbols()}):
            try:
                search_for_file(f"{symbol}.PBE")
            except Exception:
                raise GenerateError(f"calculator gpaw: no PBE PAW setup for {symbol} (pip install gpaw-data, or "
                                    "set GPAW_SETUP_PATH)") from None
    elif name == "espresso":
        command = os.environ.get("ESPRESSO_COMMAND", "pw.x").split()[0]
        if shutil.which(command) is None:
            raise GenerateError(f"calculator espresso: {command} not found (apt-get install quantum-espresso "
                                "quantum-espresso-data, or set $ESPRESSO_COMMAND)")
        choose_pseudopotentials(sorted({s for a in structures for s in a.get_chemical_symbols()}), settings)
    elif name == "sw":
        importlib.import_module("relaxtune.potentials.classical")
        importlib.import_module("relaxtune.calculator")
    elif name != "emt":
        module, _, cls = name.partition(":")
        if not cls:
            raise GenerateError(f"unknown calculator {name!r}: use gpaw, espresso, emt, sw or MODULE:CLASS")
        try:
            obj = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise GenerateError(f"calculator {name}: cannot import: {exc}") from None
        if not callable(obj):
            raise GenerateError(f"calculator {name}: {cls} is not a class")


# ---------------------------------------------------------------------------------------------- relaxing


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


def partial_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.partial.extxyz"


def same_structure(a: Atoms, b: Atoms, tol: float = 1e-6) -> bool:
    """Same atoms in the same order at the same positions and cell (to ``tol`` Å)."""
    return (len(a) == len(b) and np.array_equal(a.numbers, b.numbers)
            and np.allclose(a.positions, b.positions, atol=tol, rtol=0)
            and np.allclose(a.cell.array, b.cell.array, atol=tol, rtol=0))


def _resume_frames(atoms: Atoms, out_dir: Path, level: str | None = None) -> list[Atoms]:
    """Frames of an interrupted relaxation of ``atoms`` (empty if none, or if they belong to something else or,
    when ``level`` is given and the frames record one, to another level of theory)."""
    path = partial_path(out_dir, atoms.info["name"])
    if not path.exists():
        return []
    try:
        frames = read(path, index=":", format="extxyz")
    except Exception:  # a torn file: start again
        frames = []
    if not frames or not same_structure(frames[0], atoms, tol=1e-5):
        path.unlink(missing_ok=True)
        return []
    recorded = frames[0].info.get("level")
    if level is not None and recorded is not None and recorded != level:
        path.unlink(missing_ok=True)
        return []
    return frames


def _call_factory(factory: Callable, atoms: Atoms, settings: GenerateSettings, directory: Path) -> Calculator:
    try:
        accepts_dir = "directory" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_dir = False
    return factory(atoms, settings, directory=directory) if accepts_dir else factory(atoms, settings)


def relax_one(atoms: Atoms, out_dir: Path, settings: GenerateSettings,
              calculator_factory: Callable[..., Calculator] = make_calculator) -> dict:
    """Relax one structure, write its trajectory file, return a summary (or the failure reason)."""
    out_dir = Path(out_dir)
    name = atoms.info["name"]
    start = time.time()
    work = atoms.copy()
    work.info = {}
    work.calc = None
    previous = _resume_frames(atoms, out_dir, settings.level())
    if previous:  # continue from the last finished step; that step is recomputed (and recorded) first
        work.positions = previous[-1].positions
        work.cell = previous[-1].cell
        previous = previous[:-1]
    frames: list[Atoms] = list(previous)
    partial = partial_path(out_dir, name)
    scratch = out_dir / ".work" / name

    def record() -> None:
        frames.append(_frame(work, settings.relax_cell))
        frames[0].info["level"] = settings.level()  # a resume at another level starts again
        _atomic_write(partial, frames)

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
        record_ = {"name": name, "reason": reason, "traceback": traceback.format_exc(limit=5),
                   "settings": asdict(settings), "n_frames": len(frames), "seconds": round(time.time() - start, 1)}
        if scratch.is_dir() and any(scratch.iterdir()):
            record_["scratch"] = str(scratch)  # the DFT code's own input/output, kept for diagnosis
        tmp = out_dir / f".{name}.failed.json.tmp"
        tmp.write_text(json.dumps(record_, indent=1))
        os.replace(tmp, out_dir / f"{name}.failed.json")
        partial.unlink(missing_ok=True)
        return {"name": name, "status": "failed", "reason": reason, "seconds": record_["seconds"]}
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
    _atomic_write(out_dir / f"{name}.extxyz", frames)
    partial.unlink(missing_ok=True)
    (out_dir / f"{name}.failed.json").unlink(missing_ok=True)  # a retried failure that now worked
    shutil.rmtree(scratch, ignore_errors=True)
    return {"name": name, "status": "converged" if converged else "not_converged", "steps": len(frames) - 1,
            "seconds": header["seconds"], **({"resumed_at_step": len(previous)} if previous else {})}


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def pending(structures: list[Atoms], out_dir: Path, retry_failed: bool = False,
            level: str | None = None) -> list[Atoms]:
    """Structures with no finished file (and, unless ``retry_failed``, no failure record).

    A finished file whose first frame is not the given structure (same name, different input) or, when
    ``level`` is given, that records another level of theory, is kept and skipped with a warning: delete it to
    regenerate.
    """
    todo = []
    for atoms in structures:
        name = atoms.info["name"]
        done = out_dir / f"{name}.extxyz"
        if done.exists():
            try:
                first = read(done, index=0, format="extxyz")
                if not same_structure(first, atoms, tol=1e-5):
                    warnings.warn(f"{done}: exists but its initial structure differs from the input {name!r}; "
                                  "kept (delete it to regenerate)", stacklevel=2)
                elif level is not None and first.info.get("level", level) != level:
                    warnings.warn(f"{done}: exists at level {first.info['level']!r}, not {level!r}; kept (delete "
                                  "it to regenerate)", stacklevel=2)
            except Exception:
                warnings.warn(f"{done}: exists but cannot be read; kept (delete it to regenerate)", stacklevel=2)
            continue
        if (out_dir / f"{name}.failed.json").exists() and not retry_failed:
            continue
        todo.append(atoms)
    return todo


def generate(structures: list[Atoms], out_dir: Path | str, settings: GenerateSettings, jobs: int = 1,
             retry_failed: bool = False, on_result: Callable[[dict], None] | None = None,
             calculator_factory: Callable[..., Calculator] = make_calculator) -> list[dict]:
    """Relax every structure not done yet, ``jobs`` single-threaded workers at a time.

    ``calculator_factory(atoms, settings[, directory=])`` makes the calculator; with ``jobs > 1`` it must be
    importable by name (a module-level function), as workers are fresh processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [a.info.get("name") for a in structures]
    if any(n is None for n in names) or len(set(names)) != len(names):
        raise GenerateError("every structure needs a unique info['name'] (its output file name)")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*", str(n))]
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
         on_result: Callable[[dict], None] | None, calculator_factory: Callable[..., Calculator]) -> list[dict]:
    results = []
    if jobs <= 1 or len(todo) <= 1:
        _worker_init()
        for atoms in todo:
            results.append(relax_one(atoms, out_dir, settings, calculator_factory))
            if on_result:
                on_result(results[-1])
        return results
    import multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before they load BLAS
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = [pool.submit(relax_one, atoms, out_dir, settings, calculator_factory) for atoms in todo]
        for fut in as_completed(futures):
            results.append(fut.result())
            if on_result:
                on_result(results[-1])
    return results


def read_structures(path: Path | str) -> list[Atoms]:
    """Input structures for :func:`generate` from any ASE-readable file (all frames).

    Names: ``info['name']`` where present, else ``STEM_INDEX`` (``STEM`` for a single structure). Other
    ``info`` keys (``group`` above all: what splits are made by) are copied into the output header.
    """
    path = Path(path)
    try:
        frames = read(path, index=":")
    except Exception as exc:
        raise GenerateError(f"{path}: cannot read structures: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise GenerateError(f"{path}: no structures")
    stem = path.name.split(".")[0]
    for i, atoms in enumerate(frames):
        if not np.isfinite(atoms.positions).all():
            raise GenerateError(f"{path}: structure {i}: positions: NaN or infinite coordinates")
        atoms.calc = None
        if "name" not in atoms.info:
            atoms.info["name"] = stem if len(frames) == 1 else f"{stem}_{i}"
    return frames
