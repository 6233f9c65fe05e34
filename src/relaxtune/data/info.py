"""What is in a dataset: counts, species, sizes, convergence, settings, splits; and the datasheet.

``dataset_info`` summarises a file, a directory or a shipped dataset as a JSON-friendly dict (what
``relaxtune data info --json`` prints); ``datasheet`` renders the markdown datasheet of a shipped dataset
from its files, so it stays true as relaxations arrive (``relaxtune data datasheet builtin:NAME --write``).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from relaxtune.atomic import atomic_write_text
from relaxtune.markdown import markdown_table
from relaxtune.data.load import load_pairs
from relaxtune.data.pairs import DataWarning, RelaxationPair, frame_stress, read_splits_file
from relaxtune.data.registry import DATASETS, REFERENCE_LEVEL, BuiltinDataset, parse_builtin
from relaxtune.data.splits import SPLIT_NAMES, split_pairs


def _failed_records(directory: Path) -> dict[str, str]:
    out = {}
    for path in sorted(directory.glob("*.failed.json")):
        try:
            out[path.name[: -len(".failed.json")]] = str(json.loads(path.read_text()).get("reason", "?"))
        except (OSError, json.JSONDecodeError):
            out[path.name[: -len(".failed.json")]] = "unreadable failure record"
    return out


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    return {"min": float(arr.min()), "mean": round(float(arr.mean()), 4), "median": float(np.median(arr)),
            "max": float(arr.max())}


def summarize_pairs(pairs: list[RelaxationPair], splits: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Counts, species, sizes, convergence, settings and splits of a list of pairs."""
    species = sorted({s for p in pairs for s in p.species})
    by_group = Counter(p.group for p in pairs)
    conv = Counter(p.converged for p in pairs)
    steps = [int(p.info["n_steps"]) if "n_steps" in p.info else len(p.trajectory or [None, None]) - 1
             for p in pairs]
    max_disp = [float(np.linalg.norm(p.displacements(), axis=1).max()) for p in pairs if p.n_atoms]
    fmax_final = [float(p.info["fmax_final"]) for p in pairs if "fmax_final" in p.info]
    by_split = split_pairs(pairs, splits or None)
    split_info = {}
    for name, members in by_split.items():
        if not members and name not in SPLIT_NAMES:
            continue
        groups = list(splits[name]) if splits and name in splits else sorted({p.group for p in members})
        split_info[name] = {"n_structures": len(members), "groups": groups,
                            "n_converged": sum(1 for p in members if p.converged)}
    return {
        "n_structures": len(pairs),
        "n_converged": conv.get(True, 0),
        "n_not_converged": conv.get(False, 0),
        "n_convergence_unknown": conv.get(None, 0),
        "species": species,
        "n_atoms": _stats([p.n_atoms for p in pairs]),
        "groups": dict(sorted(by_group.items())),
        "splits": split_info,
        "settings": {
            "level": dict(Counter(str(p.info.get("level") or f"not recorded ({p.info.get('format', 'file')})")
                                  for p in pairs)),
            "calculator": dict(Counter(str(p.info.get("calculator", "unknown")) for p in pairs)),
            "fmax_target": sorted({float(p.info["fmax_target"]) for p in pairs if "fmax_target" in p.info}),
            "relax_cell": dict(Counter("cell relaxed" if p.relax_cell else "fixed cell" for p in pairs)),
        },
        "steps": _stats(steps),
        "fmax_final": _stats(fmax_final),
        "max_displacement": _stats(max_disp),
        "n_with_energy": sum(1 for p in pairs if p.energy_final is not None),
        "n_with_trajectory": sum(1 for p in pairs if p.trajectory),
        "n_with_final_stress": sum(1 for p in pairs if frame_stress(p.final) is not None),
    }


def dataset_info(spec: str | Path) -> dict[str, Any]:
    """Summary of a file, a directory, ``INITIAL:FINAL`` or ``builtin:NAME[:SPLIT]`` (see ``summarize_pairs``).

    For directories and shipped datasets it also lists failed structures (``NAME.failed.json``) and, for
    shipped datasets, how many of the planned structures are done.
    """
    spec = str(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        pairs = load_pairs(spec)
    splits = None
    directory = None
    ds: BuiltinDataset | None = None
    if spec.startswith("builtin:"):
        ds, _ = parse_builtin(spec)
        directory = ds.directory
        splits = ds.splits() or None
    elif Path(spec).is_dir():
        directory = Path(spec)
        if (directory / "splits.json").exists():
            splits = read_splits_file(directory / "splits.json")
    info = {"source": spec, **summarize_pairs(pairs, splits)}
    info["warnings"] = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    if directory is not None:
        failed = _failed_records(directory)
        if ds is not None and ds.is_view:
            wanted = set(ds.expected_names())
            failed = {k: v for k, v in failed.items() if k in wanted}
        info["n_failed"] = len(failed)
        info["failed"] = failed
    if ds is not None:
        expected = ds.expected_names(parse_builtin(spec)[1])
        have = {p.name for p in pairs}
        info["dataset"] = ds.name
        info["n_planned"] = len(expected)
        info["n_pending"] = len([n for n in expected if n not in have and n not in info.get("failed", {})])
    return info


def format_info(info: dict[str, Any]) -> str:
    """Human-readable summary of ``dataset_info``."""
    n = info["n_structures"]
    lines = [f"{info['source']}: {n} relaxation{'s' if n != 1 else ''}, {info['n_converged']} converged"
             + (f", {info['n_not_converged']} not converged" if info["n_not_converged"] else "")
             + (f", convergence unknown for {info['n_convergence_unknown']}" if info["n_convergence_unknown"] else "")]
    if "n_planned" in info:
        lines.append(f"  progress: {info['n_structures']} of {info['n_planned']} planned structures done, "
                     f"{info['n_pending']} pending, {info.get('n_failed', 0)} failed")
    lines.append(f"  species: {' '.join(info['species'])}")
    if info["n_atoms"]:
        a = info["n_atoms"]
        lines.append(f"  atoms per structure: {a['min']:g}-{a['max']:g} (mean {a['mean']:.1f})")
    if info["steps"]:
        s = info["steps"]
        lines.append(f"  reference steps: mean {s['mean']:.1f}, max {s['max']:g}")
    if info["fmax_final"]:
        lines.append(f"  final fmax: max {info['fmax_final']['max']:.4f} eV/Å")
    if info["max_displacement"]:
        d = info["max_displacement"]
        lines.append(f"  largest atom move per structure: median {d['median']:.3f} Å, max {d['max']:.3f} Å")
    st = info["settings"]
    for level, n in st["level"].items():
        lines.append(f"  level: {level} ({n})")
    if st["fmax_target"]:
        lines.append(f"  fmax target: {', '.join(f'{f:g}' for f in st['fmax_target'])} eV/Å; "
                     + ", ".join(f"{k}: {v}" for k, v in st["relax_cell"].items()))
    if info.get("n_with_final_stress"):
        lines.append(f"  relaxed structures with a DFT stress: {info['n_with_final_stress']} of {info['n_structures']}")
    lines.append(f"  groups ({len(info['groups'])}): " + ", ".join(f"{g} {n}" for g, n in info["groups"].items()))
    for name, sp in info["splits"].items():
        lines.append(f"  split {name}: {sp['n_structures']} structures; groups: {', '.join(sp['groups']) or '-'}")
    for name, reason in info.get("failed", {}).items():
        lines.append(f"  failed {name}: {reason}")
    for w in info.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- datasheet


def datasheet(name: str) -> str:
    """The markdown datasheet of a shipped dataset (``NAME`` or ``builtin:NAME``), computed from its files."""
    ds, _ = parse_builtin(name)
    if ds.is_view:  # a view's facts live in its parent's sheet
        ds = next(d for d in DATASETS.values() if d.folder == ds.folder and not d.is_view)
    has_files = ds.directory.is_dir() and any(ds.directory.glob("*.extxyz"))
    pairs = load_pairs(f"builtin:{ds.name}") if has_files else []
    splits = ds.splits()
    info = summarize_pairs(pairs, splits or None) if pairs else None
    failed = _failed_records(ds.directory) if ds.directory.is_dir() else {}
    expected = ds.expected_names()
    done = {p.name for p in pairs}
    lines = [f"# Datasheet: `builtin:{ds.name}`", "",
             "<!-- generated by `relaxtune data datasheet builtin:" + ds.name + " --write`; do not edit by hand -->",
             "", ds.description, "",
             "## Status", "",
             f"- {len(pairs)} of {len(expected)} planned relaxations present "
             f"({info['n_converged'] if info else 0} converged to the target fmax), "
             f"{len(failed)} failed, {len([n for n in expected if n not in done and n not in failed])} pending.",
             ]
    if info:
        lines.append(f"- Species: {', '.join(info['species'])}; atoms per structure: "
                     f"{info['n_atoms']['min']:g}-{info['n_atoms']['max']:g}.")
        if info["steps"]:
            lines.append(f"- Reference relaxation steps: mean {info['steps']['mean']:.1f}, max {info['steps']['max']:g}.")
        if info["fmax_final"]:
            lines.append(f"- Largest residual force on an atom in a relaxed structure: {info['fmax_final']['max']:.4f} eV/Å.")
        lines.append(f"- Largest atom move per structure (initial → relaxed, minimum image): median "
                     f"{info['max_displacement']['median']:.3f} Å, max {info['max_displacement']['max']:.3f} Å.")
        if not all(p.relax_cell for p in pairs):
            lines.append(f"- Relaxed structures that carry a DFT stress: {info['n_with_final_stress']} of {len(pairs)}.")
    lines += ["", "## Level of theory", "", f"- Reference: {REFERENCE_LEVEL}.", f"- This dataset: {ds.settings}."]
    if info:
        for level, n in info["settings"]["level"].items():
            lines.append(f"- Recorded in the file headers: `{level}` ({n} files).")
    lines += ["", "## Structures", "", ds.structures + ".", ""]
    lines += ["## Splits (by group: no group is in two splits)", ""]
    if splits:
        rows = []
        for split, groups in splits.items():
            members = [p for p in pairs if p.group in set(groups)]
            rows.append([split, ", ".join(groups), len(members), sum(1 for p in members if p.converged)])
        lines += markdown_table(["split", "groups", "structures present", "converged"], rows)
    else:
        lines.append("No splits.json.")
    if pairs:
        lines += ["", "## Counts by group", ""]
        rows = []
        for group, n in info["groups"].items():
            members = [p for p in pairs if p.group == group]
            split = next((s for s, gs in splits.items() if group in gs), "-")
            atoms = sorted({p.n_atoms for p in members})
            rows.append([group, split, n, sum(1 for p in members if p.converged),
                         "/".join(str(a) for a in atoms)])
        lines += markdown_table(["group", "split", "structures", "converged", "atoms"], rows)
    views = [d for d in DATASETS.values() if d.is_view and d.folder == ds.folder]
    for view in views:
        members = [p for p in pairs if view.view.keeps_pair(p)]
        by_split = Counter(p.split or "-" for p in members)
        lines += ["", f"## View `builtin:{view.name}`", "", view.description,
                  f"Selection: `{view.view.text}`; {len(members)} structures present "
                  f"(of {len(view.expected_names())} planned): "
                  + ", ".join(f"{s} {by_split.get(s, 0)}" for s in (splits or {"-": []})) + "."]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{k}`: {v}" for k, v in failed.items()]
    lines += ["", "## File format", "",
              "One extended-XYZ file per structure, `NAME.extxyz`, holding the whole relaxation: frame 0 is the "
              "initial structure, the last frame the relaxed one, every frame has its energy (eV) and forces "
              "(eV/Å), and its stress (eV/Å³) when the cell was relaxed; in a fixed-cell dataset the relaxed "
              "frame may carry the stress of one more SCF there (see Settings). Frame 0's header records `name`, `group`, `seed`, "
              "`converged`, `n_steps`, `fmax_target`, `fmax_final`, `relax_cell`, `level`, `calculator`. "
              "`splits.json` maps each split to its groups. Load with "
              f"`relaxtune.data.load_pairs('builtin:{ds.name}')` (or `builtin:{ds.name}:train`).",
              "", "## How to regenerate", "", "```bash", *ds.regenerate, "```",
              "Generation is resumable: finished structures are skipped, an interrupted one continues from its "
              "last step. Then refresh this sheet:", "", "```bash",
              f"relaxtune data datasheet builtin:{ds.name} --write", "```", ""]
    return "\n".join(lines)


def write_datasheet(name: str) -> Path:
    """Write ``DATASHEET.md`` into a shipped dataset's folder (atomically) and return its path."""
    ds, _ = parse_builtin(name)
    text = datasheet(name)
    return atomic_write_text(text, ds.directory / "DATASHEET.md")
