"""Does a fine-tuned model still do what its pretrained model did? The retention check of every run.

Fine-tuning on defects moves weights that every structure of those elements shares, so the host's lattice
constant, other phases and held-out DFT frames can get worse while the defects get better. This suite measures
the fine-tuned model against the pretrained one on data neither trained on, for the crystals of the training
elements (``builtin:crystals`` pairs whose elements all occur in training):

* ``eos``: an equation of state per bulk prototype of the elements (``relaxtune.data.bulk``; Birch-Murnaghan
  over isotropic strains, positions fractional): lattice constant a ∝ V0^(1/3) against DFT's relaxed cell where
  the crystals hold it, else the pretrained model's; bulk modulus against the pretrained model's;
* ``relax``: each crystal relaxed with the cell free from its initial structure, volume error against DFT;
* ``frames``: force and stress errors on the crystals' DFT frames (four per crystal along its path) and on
  ``extra_frames`` (e.g. the run's validation structures).

Every item gets a verdict, ``better``, ``same`` or ``worse`` than pretrained beyond its tolerance
(``Tolerances``), and the whole check ``kept`` when no item is worse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.eos import EquationOfState
from ase.units import GPa

from relaxtune.data.bulk import bulk_prototypes, crystals_of
from relaxtune.data.pairs import dft_frames, frame_stress
from relaxtune.evaluate import evaluate, model_dtype
from relaxtune.potentials.base import EnergyModel, single_points

#: isotropic linear strains of an equation of state (±2%: ±6% in volume, inside Birch-Murnaghan's range)
EOS_STRAINS = tuple(np.linspace(-0.02, 0.02, 7))
#: DFT frames per crystal in the frame errors
CRYSTAL_FRAMES = 4


@dataclass(frozen=True)
class Tolerances:
    """How far from pretrained an item may move and still count as ``same``: ``lattice`` (relative lattice
    constant), ``bulk_modulus`` (relative), ``volume`` (absolute change of |V/V_DFT - 1| of any one crystal),
    ``force`` (relative force RMSE), ``stress`` (relative stress RMSE)."""

    lattice: float = 0.003
    bulk_modulus: float = 0.05
    volume: float = 0.005
    force: float = 0.05
    stress: float = 0.05


def equation_of_state(model: EnergyModel, atoms: Atoms, strains: Sequence[float] = EOS_STRAINS) -> dict[str, float]:
    """Birch-Murnaghan fit of ``model``'s energy over isotropic strains of ``atoms`` (fractional positions
    kept): volume per atom V0 (Å^3), lattice scale a0 = (V0 / V_atoms)^(1/3) relative to ``atoms``' cell, bulk
    modulus (GPa)."""
    scaled = []
    for s in strains:
        a = atoms.copy()
        a.calc = None
        a.set_cell(atoms.cell.array * (1.0 + s), scale_atoms=True)
        scaled.append(a)
    energies, _, _ = single_points(model, scaled, model_dtype(model))
    volumes = [a.get_volume() for a in scaled]
    v0, _, b = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    n = len(atoms)
    return {"volume_per_atom": float(v0 / n), "lattice_scale": float((v0 / atoms.get_volume()) ** (1 / 3)),
            "bulk_modulus_gpa": float(b / GPa)}


def frame_errors(model: EnergyModel, frames: Sequence[Atoms]) -> dict[str, float | int]:
    """Force RMSE (eV/Å) over every component of ``frames`` and stress RMSE (GPa) over frames with a DFT
    stress."""
    if not frames:
        return {"n_frames": 0, "force_rmse": None, "stress_rmse_gpa": None}
    with_stress = [frame_stress(a) for a in frames]
    _, forces, stresses = single_points(model, frames, model_dtype(model),
                                        stress=any(s is not None for s in with_stress))
    f_err = np.concatenate([(f - a.get_forces()).ravel() for f, a in zip(forces, frames)])
    s_err = [((s - ref) / GPa).ravel() for s, ref in zip(stresses or [], with_stress) if ref is not None]
    return {"n_frames": len(frames), "force_rmse": float(np.sqrt(np.mean(f_err ** 2))),
            "stress_rmse_gpa": float(np.sqrt(np.mean(np.concatenate(s_err) ** 2))) if s_err else None}


def _verdict(change: float | None, tolerance: float) -> str:
    """``better`` / ``same`` / ``worse`` for a change where negative is better."""
    if change is None or not np.isfinite(change):
        return "worse"
    return "better" if change < -tolerance else "worse" if change > tolerance else "same"


def _prototypes(pairs: Sequence) -> dict[str, list]:
    groups: dict[str, list] = {}
    for p in pairs:
        groups.setdefault(p.group or p.name, []).append(p)
    return groups


def eos_items(finetuned: EnergyModel, pretrained: EnergyModel, prototypes: Sequence[Atoms], pairs: Sequence,
              tol: Tolerances) -> list[dict]:
    """Lattice constant and bulk modulus per prototype (``relaxtune.data.bulk.bulk_prototypes``). The lattice
    constant is compared with DFT's where ``pairs`` hold the prototype (the median relaxed volume per atom of
    its crystals), else with the pretrained model's; the bulk modulus always with the pretrained model's."""
    dft_volume = {g: float(np.median([p.final.get_volume() / len(p.final) for p in members]))
                  for g, members in _prototypes(pairs).items()}
    items = []
    for proto in prototypes:
        name = proto.info["name"]
        pre, ft = equation_of_state(pretrained, proto), equation_of_state(finetuned, proto)
        shift = ft["lattice_scale"] / pre["lattice_scale"] - 1
        if name in dft_volume:
            dft_scale = (dft_volume[name] / (proto.get_volume() / len(proto))) ** (1 / 3)
            err_pre, err_ft = pre["lattice_scale"] / dft_scale - 1, ft["lattice_scale"] / dft_scale - 1
            verdict = "same" if abs(shift) <= tol.lattice else _verdict(abs(err_ft) - abs(err_pre), 0.0)
            items.append({"item": f"eos {name}: lattice constant vs DFT", "pretrained": err_pre,
                          "finetuned": err_ft, "change_vs_pretrained": shift, "tolerance": tol.lattice,
                          "verdict": verdict})
        else:
            items.append({"item": f"eos {name}: lattice constant vs pretrained (no DFT)", "pretrained": 0.0,
                          "finetuned": shift, "change_vs_pretrained": shift, "tolerance": tol.lattice,
                          "verdict": _verdict(abs(shift), tol.lattice)})
        b_shift = ft["bulk_modulus_gpa"] / pre["bulk_modulus_gpa"] - 1
        items.append({"item": f"eos {name}: bulk modulus (GPa)", "pretrained": pre["bulk_modulus_gpa"],
                      "finetuned": ft["bulk_modulus_gpa"], "change_vs_pretrained": b_shift,
                      "tolerance": tol.bulk_modulus, "verdict": _verdict(abs(b_shift), tol.bulk_modulus)})
    return items


def relax_items(finetuned: EnergyModel, pretrained: EnergyModel, pairs: Sequence, tol: Tolerances,
                fmax: float = 0.02, max_steps: int = 500, batch_size: int = 8, optimizer: str = "lbfgs") -> list[dict]:
    """Volume error of every crystal relaxed with the cell free (both models alike; L-BFGS needs about 0.4x
    FIRE's model calls here), per prototype: the worst change of |V/V_DFT - 1| of one of its crystals, with the
    mean |V/V_DFT - 1| of both models."""
    kwargs = dict(fmax=fmax, max_steps=max_steps, batch_size=batch_size, optimizer=optimizer)
    rows_pre = {r["name"]: r for r in evaluate(pretrained, pairs, **kwargs).rows}
    rows_ft = {r["name"]: r for r in evaluate(finetuned, pairs, **kwargs).rows}
    items = []
    for group, members in _prototypes(pairs).items():
        pre = [rows_pre[p.name].get("volume_error") for p in members]
        ft = [rows_ft[p.name].get("volume_error") for p in members]
        if any(v is None for v in pre + ft):
            worst = None
        else:
            worst = max(abs(f) - abs(p) for p, f in zip(pre, ft))
        items.append({"item": f"relax {group}: |volume error| vs DFT ({len(members)} crystals)",
                      "pretrained": float(np.mean([abs(v) for v in pre if v is not None])) if pre else None,
                      "finetuned": float(np.mean([abs(v) for v in ft if v is not None])) if ft else None,
                      "change_vs_pretrained": worst, "tolerance": tol.volume,
                      "verdict": _verdict(worst, tol.volume)})
    return items


def frame_items(finetuned: EnergyModel, pretrained: EnergyModel, frames: dict[str, list], tol: Tolerances) -> list[dict]:
    """Force (and stress) RMSE on each named set of DFT frames, relative change against pretrained."""
    items = []
    for name, group in frames.items():
        if not group:
            continue
        pre, ft = frame_errors(pretrained, group), frame_errors(finetuned, group)
        for key, label, t in (("force_rmse", "force RMSE (eV/Å)", tol.force),
                              ("stress_rmse_gpa", "stress RMSE (GPa)", tol.stress)):
            if pre[key] is None:
                continue
            change = ft[key] / pre[key] - 1
            items.append({"item": f"frames {name}: {label}, {pre['n_frames']} frames", "pretrained": pre[key],
                          "finetuned": ft[key], "change_vs_pretrained": change, "tolerance": t,
                          "verdict": _verdict(change, t)})
    return items


def crystal_frames(pair, k: int = CRYSTAL_FRAMES) -> list[Atoms]:
    """``k`` DFT frames of a crystal's relaxation spread evenly along its path, the first and the relaxed one
    included: the frames of 50 crystals cost more than the rest of the suite."""
    frames = dft_frames(pair)
    return [frames[i] for i in np.unique(np.linspace(0, len(frames) - 1, k).round().astype(int))]


def _identity(pair) -> tuple[str, str]:
    """What makes a run's training pair the same structure as a checked crystal: name and composition."""
    return pair.name, pair.initial.get_chemical_formula()


def retention(finetuned: EnergyModel, pretrained: EnergyModel, species: Sequence[str], *,
              extra_frames: dict[str, list] | None = None, tolerances: Tolerances = Tolerances(),
              trained_on: Sequence = ()) -> dict[str, Any]:
    """The retention suite (module docstring) for a model fine-tuned on ``species``: ``items`` (one dict each,
    with its verdict), counts of better/same/worse, and ``kept`` (no item worse). ``trained_on``: pairs the run
    fitted (e.g. its replay set); the groups of checked crystals among them are listed as ``trained_on_groups``,
    since their items are not held out."""
    pairs = crystals_of(species)
    fitted = {_identity(p) for p in trained_on}
    overlap = sorted({p.group or p.name for p in pairs if _identity(p) in fitted})
    frames = {"crystals": [f for p in pairs for f in crystal_frames(p)], **(extra_frames or {})}
    with torch.no_grad():
        items = eos_items(finetuned, pretrained, bulk_prototypes(species), pairs, tolerances)
    items += relax_items(finetuned, pretrained, pairs, tolerances)
    items += frame_items(finetuned, pretrained, frames, tolerances)
    counts = {v: sum(i["verdict"] == v for i in items) for v in ("better", "same", "worse")}
    return {"species": sorted(species), "n_crystals": len(pairs), "tolerances": asdict(tolerances),
            "items": items, "counts": counts, "kept": counts["worse"] == 0, "trained_on_groups": overlap}


def retention_lines(result: dict[str, Any]) -> list[str]:
    """The suite as log lines: one per item, then the verdict."""
    lines = [f"retention against the pretrained model ({result['n_crystals']} crystals of "
             f"{', '.join(result['species'])}):"]
    for it in result["items"]:
        pre, ft = it["pretrained"], it["finetuned"]
        pct = "%" if ("lattice" in it["item"] or "volume" in it["item"]) else ""
        scale = 100.0 if pct else 1.0
        lines.append(f"  {it['verdict']:>6}  {it['item']}: pretrained {pre * scale:+.3f}{pct}, "
                     f"fine-tuned {ft * scale:+.3f}{pct}")
    if result.get("trained_on_groups"):
        lines.append(f"note: the run fitted DFT frames of the crystals of {', '.join(result['trained_on_groups'])} "
                     "(--replay): their items are not held out")
    c = result["counts"]
    lines.append(f"retention: {c['better']} better, {c['same']} same, {c['worse']} worse -> "
                 f"{'kept' if result['kept'] else 'NOT kept'}")
    return lines
