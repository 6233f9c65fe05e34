"""Relaxation pairs (initial structure, DFT-relaxed structure) read from the files DFT codes write.

One relaxation per trajectory: the first frame is the initial structure, the last the relaxed one. Readers:
extxyz / ASE ``.traj`` (one trajectory per file; a file whose frames carry changing ``info['name']`` holds
several, split at each new name), VASP ``vasprun.xml`` / ``OUTCAR``, Quantum ESPRESSO output (``pw.x``
``.pwo``/``.out``), a directory of such files (or of VASP/QE run folders), and two files of initial and
final structures (``initial.extxyz:final.extxyz``, paired frame by frame). Every pair is validated (atom
count, species and order, cell, periodicity, finite numbers); a problem raises ``DataError``, one line
naming the file, the structure index and the field. Resolving a dataset spec (``builtin:NAME`` included)
to pairs is ``relaxtune.data.load.load_pairs``.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.io import read

#: displacement (Å, minimum image) above which an initial→final atom move is reported as suspicious.
MAX_PLAUSIBLE_DISPLACEMENT = 1.5
_COMPRESSED = (".gz", ".bz2", ".xz")
_SKIP_SUFFIXES = (".json", ".md", ".txt", ".csv", ".tmp", ".py", ".sh", ".in", ".pwi")


class DataError(ValueError):
    """A dataset file that cannot be used as it is: one line, ``FILE: structure I: FIELD: what is wrong``."""


class DataWarning(UserWarning):
    """Something in a dataset that is probably wrong but not fatal (e.g. very large initial→final moves)."""


@dataclass
class RelaxationPair:
    """One relaxation: the initial structure and its DFT-relaxed counterpart (same atoms, same order).

    ``group`` is what splits are made by (defect type, material); ``trajectory`` holds every frame (with
    energies and forces where the file has them); ``info`` is the first frame's header (settings, outcome).
    ``relax_cell`` says whether the reference relaxed the cell too; ``converged`` is the reference's own
    verdict when the file records it; ``split`` the split this pair belongs to in its dataset's
    ``splits.json``, if any.
    """

    name: str
    group: str
    initial: Atoms
    final: Atoms
    energy_final: float | None = None
    trajectory: list[Atoms] | None = None
    source: str = ""
    relax_cell: bool = False
    converged: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)
    split: str | None = None

    @property
    def n_atoms(self) -> int:
        return len(self.initial)

    @property
    def species(self) -> list[str]:
        return sorted(set(self.initial.get_chemical_symbols()))

    def displacements(self) -> np.ndarray:
        """(n_atoms, 3) initial→final displacement in Å, minimum image (fractional, in the final cell)."""
        return minimum_image_displacement(self.initial, self.final)


# ---------------------------------------------------------------------------------------------- helpers


def minimum_image_displacement(initial: Atoms, final: Atoms) -> np.ndarray:
    """Displacements ``final - initial`` with periodic directions wrapped to the nearest image.

    Computed in fractional coordinates (so it also holds when the cell was relaxed) and expressed in the
    final cell; non-periodic directions are taken as they are.
    """
    pbc = np.asarray(final.pbc, dtype=bool)
    if not pbc.any():
        return final.positions - initial.positions
    cell_i, cell_f = initial.cell.complete(), final.cell.complete()
    frac = final.positions @ np.linalg.inv(cell_f) - initial.positions @ np.linalg.inv(cell_i)
    frac[:, pbc] -= np.round(frac[:, pbc])
    return frac @ cell_f


def _energy(atoms: Atoms) -> float | None:
    calc = atoms.calc
    if calc is not None and getattr(calc, "results", None) and "energy" in calc.results:
        return float(calc.results["energy"])
    value = atoms.info.get("energy")
    return float(value) if isinstance(value, (int, float, np.floating, np.integer)) else None


def _forces(atoms: Atoms) -> np.ndarray | None:
    calc = atoms.calc
    if calc is not None and getattr(calc, "results", None) and "forces" in calc.results:
        return np.asarray(calc.results["forces"])
    return atoms.arrays.get("forces")


def frame_stress(atoms: Atoms) -> np.ndarray | None:
    """The stress a frame carries (3x3, eV/Å^3, ASE's sign), or None when it has none or a non-finite one."""
    try:
        stress = atoms.get_stress(voigt=False)
    except Exception:  # no calculator, or one without a stress
        return None
    if stress is None or not np.all(np.isfinite(stress)):
        return None
    return np.asarray(stress, dtype=float)


def dft_frames(pair) -> list:
    """DFT frames with energy and forces (the trajectory, else initial and final if they carry them); the last
    one is the relaxed frame."""
    frames = list(pair.trajectory) if pair.trajectory else [pair.initial, pair.final]
    out = []
    for a in frames:
        try:
            e, f = a.get_potential_energy(), a.get_forces()
        except Exception:
            continue
        if e is not None and f is not None and np.all(np.isfinite(f)) and np.isfinite(e):
            out.append(a)
    return out


def _plain_info(atoms: Atoms) -> dict[str, Any]:
    """JSON-friendly copy of a frame's header (numpy scalars made Python scalars, arrays dropped)."""
    out: dict[str, Any] = {}
    for key, value in atoms.info.items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
        elif isinstance(value, str):
            out[key] = value
    return out


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("t", "true", "1", "f", "false", "0"):
        return value.strip().lower() in ("t", "true", "1")
    if isinstance(value, (int, np.integer)):
        return bool(value)
    return None


# ------------------------------------------------------------------------------------------ formats


def _bare_name(path: Path) -> str:
    name = path.name.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


_GENERIC_STEMS = ("vasprun", "outcar", "espresso", "pw", "relax", "out", "output", "log", "scf", "vc-relax")


def _stem(path: Path) -> str:
    """File name without compression suffix and extension, original case (``run.extxyz.gz`` -> ``run``)."""
    name = path.name
    for ext in _COMPRESSED:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _sniff(path: Path, n_bytes: int = 20000) -> str:
    try:
        if path.suffix.lower() in _COMPRESSED:
            opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[path.suffix.lower()]
            with opener(path, "rt", errors="replace") as fh:
                return fh.read(n_bytes)
        with open(path, errors="replace") as fh:
            return fh.read(n_bytes)
    except OSError:
        return ""


def detect_format(path: Path) -> str | None:
    """The ASE format of a relaxation file from its name (and, for ``.out``/``.log``, its content)."""
    name = _bare_name(path)
    if name.endswith((".extxyz", ".xyz")):
        return "extxyz"
    if name.endswith(".traj"):
        return "traj"
    if name.endswith(".xml") and "vasprun" in name:
        return "vasp-xml"
    if name.startswith("outcar"):
        return "vasp-out"
    if name.endswith(".pwo"):
        return "espresso-out"
    if name.endswith((".out", ".log", ".xml")):
        head = _sniff(path)
        if "Program PWSCF" in head:
            return "espresso-out"
        if "<modeling>" in head:
            return "vasp-xml"
        if " vasp." in head and "POTCAR" in head:
            return "vasp-out"
    return None


def read_frames(path: Path | str, fmt: str | None = None) -> list[Atoms]:
    """Every frame of a trajectory file (``DataError`` if it cannot be read)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise DataError(f"{path}: format: not a recognised relaxation file (extxyz, traj, vasprun.xml, OUTCAR, "
                        "QE .pwo/.out)")
    try:
        frames = read(path, index=":", format=fmt)
    except Exception as exc:  # ASE raises many different types on malformed input
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: format: cannot read as {fmt}: {msg}") from None
    if isinstance(frames, Atoms):
        frames = [frames]
    if not frames:
        raise DataError(f"{path}: frames: no structures in the file")
    return list(frames)


def _split_trajectories(frames: list[Atoms]) -> list[list[Atoms]]:
    """One trajectory per file, unless frames carry ``info['name']`` that changes: a new name starts one."""
    out: list[list[Atoms]] = []
    current_name = None
    for i, frame in enumerate(frames):
        name = frame.info.get("name")
        if i == 0 or (name is not None and name != current_name):
            out.append([])
            current_name = name if name is not None else current_name
        out[-1].append(frame)
    return out


# ------------------------------------------------------------------------------------------ validation


def _check_finite(atoms: Atoms, where: str) -> None:
    if not np.isfinite(atoms.positions).all():
        raise DataError(f"{where}: positions: NaN or infinite coordinates")
    if np.asarray(atoms.pbc).any() and not np.isfinite(atoms.cell.array).all():
        raise DataError(f"{where}: cell: NaN or infinite lattice vectors")
    energy = _energy(atoms)
    if energy is not None and not np.isfinite(energy):
        raise DataError(f"{where}: energy: NaN or infinite energy")
    forces = _forces(atoms)
    if forces is not None and not np.isfinite(forces).all():
        raise DataError(f"{where}: forces: NaN or infinite forces")


def _check_same_atoms(ref: Atoms, other: Atoms, where: str, what: str) -> None:
    if len(ref) != len(other):
        raise DataError(f"{where}: n_atoms: initial has {len(ref)} atoms, {what} has {len(other)}")
    if not np.array_equal(ref.numbers, other.numbers):
        j = int(np.flatnonzero(ref.numbers != other.numbers)[0])
        raise DataError(f"{where}: species: atom {j} is {ref.get_chemical_symbols()[j]} in the initial structure "
                        f"but {other.get_chemical_symbols()[j]} in {what} (species and order must match)")
    if not np.array_equal(np.asarray(ref.pbc, bool), np.asarray(other.pbc, bool)):
        raise DataError(f"{where}: pbc: initial {ref.pbc.tolist()} but {what} {other.pbc.tolist()}")


def _cells_equal(a: Atoms, b: Atoms, tol: float = 1e-5) -> bool:
    return bool(np.allclose(a.cell.array, b.cell.array, atol=tol, rtol=0.0))


def validate_pair(initial: Atoms, final: Atoms, where: str, relax_cell: bool | None = None,
                  frames: Sequence[Atoms] | None = None,
                  max_displacement: float | None = MAX_PLAUSIBLE_DISPLACEMENT) -> bool:
    """Raise ``DataError`` if ``final`` is not a relaxation of ``initial``; return whether the cell relaxed.

    ``relax_cell`` None means: detect it (a trajectory whose cell changes is a cell relaxation; two separate
    structures with different cells are an error unless ``relax_cell`` is True). A minimum-image move larger
    than ``max_displacement`` Å only warns (it usually means wrapped coordinates or reordered atoms).
    """
    frames = list(frames) if frames is not None else [initial, final]
    for k, frame in enumerate(frames):
        label = "final structure" if frame is final else f"frame {k}"
        _check_finite(frame, where if frame is initial or frame is final else f"{where}: frame {k}")
        if k > 0:
            _check_same_atoms(initial, frame, where, label)
    cell_changes = any(not _cells_equal(initial, f) for f in frames[1:])
    if cell_changes and relax_cell is False:
        raise DataError(f"{where}: cell: the final cell differs from the initial one but the cell was not "
                        "relaxed (relax_cell=F); pass relax_cell=True if it was")
    if cell_changes and relax_cell is None and len(frames) <= 2:
        raise DataError(f"{where}: cell: the final cell differs from the initial one; if the reference relaxed "
                        "the cell, mark it (relax_cell=T in the header, or relax_cell=True)")
    if max_displacement is not None:
        disp = np.linalg.norm(minimum_image_displacement(initial, final), axis=1)
        if len(disp) and disp.max() > max_displacement:
            j = int(disp.argmax())
            warnings.warn(f"{where}: positions: atom {j} moves {disp[j]:.2f} Å from the initial to the final "
                          f"structure (minimum image, > {max_displacement} Å): wrapped or reordered atoms?",
                          DataWarning, stacklevel=3)
    return bool(relax_cell) or cell_changes


# ---------------------------------------------------------------------------------------------- readers


def _group_of(info: dict, default: str) -> str:
    for key in ("group", "defect"):
        if info.get(key) not in (None, ""):
            return str(info[key])
    return default


def _pair_from_frames(frames: list[Atoms], source: Path, index: int, n_in_file: int, default_name: str,
                      default_group: str, relax_cell: bool | None, max_displacement: float | None
                      ) -> RelaxationPair:
    where = f"{source}: structure {index}"
    if len(frames) < 2:
        raise DataError(f"{where}: frames: only 1 frame; a relaxation needs the initial and the relaxed "
                        "structure (for separate files use INITIAL:FINAL)")
    header = _plain_info(frames[0])
    header.pop("energy", None)
    flag = _as_bool(header.get("relax_cell")) if relax_cell is None else relax_cell
    cell_relaxed = validate_pair(frames[0], frames[-1], where, relax_cell=flag, frames=frames,
                                 max_displacement=max_displacement)
    if flag is None and cell_relaxed:  # detected from a trajectory whose cell changes
        flag = True
    name = str(header.get("name") or (default_name if n_in_file == 1 else f"{default_name}_{index}"))
    return RelaxationPair(
        name=name, group=_group_of(header, default_group), initial=frames[0], final=frames[-1],
        energy_final=_energy(frames[-1]), trajectory=frames, source=str(source), relax_cell=bool(flag),
        converged=_as_bool(header.get("converged")), info=header,
    )


def read_trajectory_pairs(path: Path | str, relax_cell: bool | None = None,
                          max_displacement: float | None = MAX_PLAUSIBLE_DISPLACEMENT) -> list[RelaxationPair]:
    """Pairs from one trajectory file (first frame → last frame; several if frame names change)."""
    path = Path(path)
    fmt = detect_format(path)
    frames = read_frames(path, fmt)
    stem = _stem(path)
    if stem.lower() in _GENERIC_STEMS:
        stem = path.resolve().parent.name or stem  # VASP/QE runs are named by their folder
    trajectories = _split_trajectories(frames)
    pairs = [_pair_from_frames(traj, path, i, len(trajectories), stem, stem, relax_cell, max_displacement)
             for i, traj in enumerate(trajectories)]
    for p in pairs:
        p.info.setdefault("format", fmt)
    return pairs


def read_initial_final(initial: Path | str, final: Path | str, relax_cell: bool | None = None,
                       max_displacement: float | None = MAX_PLAUSIBLE_DISPLACEMENT) -> list[RelaxationPair]:
    """Pairs from two files: the i-th structure of ``initial`` relaxes to the i-th of ``final``."""
    initial, final = Path(initial), Path(final)
    first = read_frames(initial, detect_format(initial) or None)
    last = read_frames(final, detect_format(final) or None)
    if len(first) != len(last):
        raise DataError(f"{final}: structures: {len(first)} initial structures in {initial.name} but {len(last)} "
                        "final ones")
    stem = _stem(initial)
    pairs = []
    for i, (a, b) in enumerate(zip(first, last)):
        where = f"{initial}:{final.name}: structure {i}"
        header = {**_plain_info(b), **_plain_info(a)}
        header.pop("energy", None)
        flag = relax_cell if relax_cell is not None else _as_bool(header.get("relax_cell"))
        flag = validate_pair(a, b, where, relax_cell=flag, max_displacement=max_displacement)
        name = str(header.get("name") or (stem if len(first) == 1 else f"{stem}_{i}"))
        pairs.append(RelaxationPair(
            name=name, group=_group_of(header, stem), initial=a, final=b, energy_final=_energy(b),
            trajectory=None, source=f"{initial}:{final}", relax_cell=flag,
            converged=_as_bool(header.get("converged")), info=header,
        ))
    return pairs


def _relaxation_files(directory: Path) -> list[Path]:
    """Relaxation files in a directory, sorted; run folders (one vasprun.xml/OUTCAR/.pwo each) included."""
    out = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.name.lower().endswith(_SKIP_SUFFIXES):
            continue
        if entry.is_file() and detect_format(entry):
            out.append(entry)
        elif entry.is_dir():
            inner = [p for p in sorted(entry.iterdir()) if p.is_file() and not p.name.startswith(".")]
            for preferred in ("vasp-xml", "vasp-out", "espresso-out"):
                hits = [p for p in inner if detect_format(p) == preferred]
                if hits:
                    out.append(hits[0])
                    break
    return out


def read_splits_file(path: Path) -> dict[str, list[str]]:
    """A ``splits.json``: ``{"train": [groups], "val": [...], "test": [...]}`` (``DataError`` if malformed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: splits: cannot read JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(g, str) for g in v)
                                             for v in data.values()):
        raise DataError(f'{path}: splits: expected {{"train": [groups], "val": [...], "test": [...]}}')
    seen: dict[str, str] = {}
    for split, groups in data.items():
        for g in groups:
            if g in seen and seen[g] != split:
                raise DataError(f"{path}: splits: group {g!r} is in both {seen[g]!r} and {split!r}")
            seen[g] = split
    return {str(k): list(v) for k, v in data.items()}


def _assign_splits(pairs: list[RelaxationPair], splits: dict[str, list[str]]) -> None:
    where = {g: s for s, groups in splits.items() for g in groups}
    for p in pairs:
        p.split = where.get(p.group)


def read_directory(directory: Path | str, relax_cell: bool | None = None,
                   max_displacement: float | None = MAX_PLAUSIBLE_DISPLACEMENT) -> list[RelaxationPair]:
    """Every relaxation in a directory; pairs get their split from ``splits.json`` there, if present."""
    directory = Path(directory)
    files = _relaxation_files(directory)
    if not files:
        raise DataError(f"{directory}: files: no relaxation files (extxyz, traj, vasprun.xml, OUTCAR, QE output)")
    pairs = [p for f in files for p in read_trajectory_pairs(f, relax_cell, max_displacement)]
    if (directory / "splits.json").exists():
        _assign_splits(pairs, read_splits_file(directory / "splits.json"))
    return pairs
