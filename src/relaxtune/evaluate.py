"""How well a model relaxes: relax every initial structure of a dataset and compare with the DFT-relaxed one.

The model relaxes with FIRE to ``fmax`` 0.02 eV/Å by default, as tight as the shipped reference data (BFGS to
0.02), so that the Dq left measures the model, not the convergence noise of either side. Structures relax
together in batches (``batch_size``). Metrics: Dq mean/median, RMSD and max displacement (minimum image),
basin match rate (max displacement < 0.1 Å), converged rate, steps; per-structure rows add the relaxed-energy
error where the dataset has a DFT energy (model and DFT total energies; their difference includes any constant
reference offset between the two, so compare errors between models, not to zero).

Pairs whose reference relaxed the cell too (``pair.relax_cell``, e.g. the shipped crystals) relax with the cell
free (FrechetCellFilter coordinates, same ``fmax`` on the cell rows, as the reference's ASE filter); their rows
add the cell error: ``volume_error`` (V_model / V_DFT - 1) and ``strain_max`` (largest entry of the symmetric
strain that takes the DFT cell to the model's). Their positions are compared as fractional coordinates placed in
the DFT cell: Dq then measures the arrangement of the atoms, and the cell error, reported on its own, does not leak
into it in proportion to how far an atom sits from the origin (measured on GaAs_0 with pretrained CHGNet: 0.17 Å
largest Cartesian difference, 0.036 Å in the DFT cell).

``start="relaxed"`` relaxes from the DFT-relaxed structure instead: the model slides into its own nearest
minimum, and Dq then measures how far that minimum lies from DFT's, free of which path or basin a relaxation
from the initial structure happens to take (a diagnostic of the potential, not of the relaxation).

``symprec`` (Å, off by default) adds Dq up to a symmetry of the initial structure (``relaxtune.symmetry``):
``dq_sym``, ``max_disp_sym`` and ``basin_match_sym`` per row, the smallest over the space-group operations
spglib finds for the initial structure at that tolerance, so that a defect that breaks its site's symmetry in
another, equivalent direction than DFT's relaxation did is not counted as a different structure. The shipped
Si defects, rattled by 0.05 Å, need 0.6 Å for spglib to find their sites' full symmetry (24 operations for
the vacancy and the tetrahedral interstitial; at 0.3 Å 1-2, at 0.5 Å 1-24 by rattle).

``details=True`` adds to each row the per-atom displacements behind Dq (``displacements``, Å, measured as Dq is)
and the energy after every optimizer step (``energy_trace``, eV, step 0 = the start): what ``relaxtune report``
plots. Off by default, since the trace is kept for every step of every chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from relaxtune.potentials.base import EnergyModel
from relaxtune.relax import RelaxConfig, relax
from relaxtune.state import Batch
from relaxtune.symmetry import symmetric_distance, symmetry_operations
from relaxtune import metrics as distance

#: max per-atom displacement (Å) below which the model found the DFT basin.
BASIN_TOLERANCE = 0.1
#: where a relaxation of a pair begins: its initial structure or its DFT-relaxed (final) one.
STARTS = ("initial", "relaxed")


def start_structures(pairs: Sequence, start: str) -> list:
    """The structure each pair's relaxation begins from (``start`` in :data:`STARTS`)."""
    if start not in STARTS:
        raise ValueError(f"start: {start!r} is not initial or relaxed")
    return [p.final if start == "relaxed" else p.initial for p in pairs]


@dataclass
class Evaluation:
    """``metrics``: the summary dict; ``rows``: one dict per structure."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def model_dtype(model: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a model computes in (its first floating parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def finite_mean(values: Sequence[float | None]) -> float | None:
    """The mean of the finite values (None and NaN left out), or None when there are none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics dict from per-structure rows (blown-up structures count as not converged and out of
    basin, and are left out of the distance means)."""
    n = len(rows)
    dqs = [r["dq"] for r in rows]
    out = {
        "n": n,
        "dq_mean": finite_mean(dqs),
        "dq_median": _median(dqs),
        "rmsd_mean": finite_mean([r["rmsd"] for r in rows]),
        "max_disp_mean": finite_mean([r["max_disp"] for r in rows]),
        "basin_match_rate": (sum(bool(r["basin_match"]) for r in rows) / n) if n else None,
        "converged_rate": (sum(bool(r["converged"]) for r in rows) / n) if n else None,
        "steps_mean": finite_mean([float(r["steps"]) for r in rows]),
        "n_blew_up": sum(bool(r.get("blew_up")) for r in rows),
    }
    sym = [r for r in rows if r.get("dq_sym") is not None]
    if sym:
        out["dq_sym_mean"] = finite_mean([r["dq_sym"] for r in sym])
        out["basin_match_sym_rate"] = sum(bool(r["basin_match_sym"]) for r in rows) / n
    errs = [r["energy_error_per_atom"] for r in rows if r.get("energy_error_per_atom") is not None]
    cell_rows = [r for r in rows if "volume_error" in r]
    if cell_rows:
        out["n_cell_relaxed"] = len(cell_rows)
        out["volume_error_abs_mean"] = finite_mean([abs(r["volume_error"]) for r in cell_rows if r["volume_error"] is not None])
        out["strain_max_mean"] = finite_mean([r["strain_max"] for r in cell_rows])
    if errs:
        out["energy_error_per_atom_mean"] = finite_mean(errs)
        out["energy_mae_per_atom"] = finite_mean([abs(e) for e in errs])
    return out


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """Consecutive chunks of at most ``size`` pairs that agree on ``relax_cell`` (one relaxation call each);
    the order of ``items`` is kept."""
    size = max(1, int(size))
    out: list[list] = []
    for item in items:
        if out and len(out[-1]) < size and out[-1][0].relax_cell == item.relax_cell:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def in_reference_cell(batch: Batch, reference_cell: torch.Tensor) -> Batch:
    """``batch`` with each structure's fractional coordinates placed in ``reference_cell`` (n_systems, 3, 3);
    the model's own cell is in the relaxation result, for ``cell_errors``."""
    frac = torch.linalg.solve(batch.cell[batch.system_idx].transpose(1, 2), batch.positions.unsqueeze(-1)).squeeze(-1)
    positions = torch.einsum("ak,akl->al", frac, reference_cell[batch.system_idx])
    return batch.replace(positions=positions, cell=reference_cell)


def cell_errors(cell: np.ndarray, reference_cell: np.ndarray) -> dict[str, float]:
    """Volume error (relative) and the largest entry of the symmetric strain taking ``reference_cell`` to
    ``cell`` (row vectors: cell = reference_cell @ F, strain = (F + F^T) / 2 - I)."""
    deformation = np.linalg.solve(reference_cell, cell)
    strain = 0.5 * (deformation + deformation.T) - np.eye(3)
    volume_error = abs(np.linalg.det(cell)) / abs(np.linalg.det(reference_cell)) - 1.0
    return {"volume_error": float(volume_error), "strain_max": float(np.abs(strain).max())}


def _symmetric_row(final: Batch, k: int, reference: torch.Tensor, pair, symprec: float, bad: bool) -> dict[str, Any]:
    """The ``*_sym`` fields of structure ``k``'s row (``reference``: the chunk's reference positions)."""
    ops = symmetry_operations(pair.initial, symprec)
    if bad:
        return {"dq_sym": None, "max_disp_sym": None, "basin_match_sym": False, "n_symmetry_ops": len(ops)}
    atoms = final.system_slices()[k]
    dq_sym, max_disp_sym = symmetric_distance(final, k, reference[atoms], ops)
    return {"dq_sym": dq_sym, "max_disp_sym": max_disp_sym, "basin_match_sym": max_disp_sym < BASIN_TOLERANCE,
            "n_symmetry_ops": len(ops)}


def _per_atom_displacements(final: Batch, reference: torch.Tensor) -> np.ndarray:
    """Each atom's distance (Å) to its reference position, minimum image, as Dq measures it."""
    d = distance.minimum_image_displacement(final.positions, reference, final.cell, final.pbc, final.system_idx)
    return d.norm(dim=-1).detach().cpu().double().numpy()


def evaluate(
    model: EnergyModel,
    pairs: Sequence,
    *,
    fmax: float = 0.02,
    optimizer: str = "fire",
    max_steps: int = 500,
    step_size: float | None = None,
    batch_size: int = 4,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    start: str = "initial",
    symprec: float | None = None,
    details: bool = False,
) -> Evaluation:
    """Relax each pair's initial (or, ``start="relaxed"``, final) structure with ``model`` (no graph) and
    compare with its final structure (also up to the initial structure's symmetry at ``symprec``, if given).
    ``step_size`` is η: GD's step (Å²/eV) or FIRE's initial dt; None keeps ``RelaxConfig``'s default.
    ``details`` adds ``displacements`` and ``energy_trace`` to the rows (module docstring)."""
    start_structures([], start)  # reject a bad start before any work

    dtype = dtype or model_dtype(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    eta = {} if step_size is None else {RelaxConfig.step_field(optimizer): step_size}
    configs = {free: RelaxConfig(optimizer=optimizer, fmax=fmax, max_steps=max_steps, relax_cell=free, **eta)
               for free in (False, True)}
    rows: list[dict[str, Any]] = []
    pieces = chunks(list(pairs), batch_size)
    bar = None
    if progress:
        bar = tqdm(total=len(pairs), desc="evaluate", unit="structure", leave=False)
    for chunk in pieces:
        batch = Batch.from_atoms(start_structures(chunk, start), dtype=dtype, device=device)
        reference = torch.tensor(np.concatenate([p.final.get_positions() for p in chunk]), dtype=dtype, device=device)
        model.check_supported(batch)
        with torch.no_grad():
            result = relax(model, batch, configs[chunk[0].relax_cell], grad_mode="none", record_trace=details)
        final = result.batch.replace(positions=result.batch.positions.detach())
        if chunk[0].relax_cell:
            final = in_reference_cell(final, torch.tensor(np.stack([p.final.cell.array for p in chunk]),
                                                          dtype=dtype, device=device))
        with torch.no_grad():
            dq = distance.dq(final, reference)
            rmsd = distance.rmsd(final, reference)
            mx = distance.max_displacement(final, reference)
            per_atom = _per_atom_displacements(final, reference) if details else None
        trace = result.energy_trace.detach().cpu().double().numpy() if details else None
        blew = result.blew_up.detach().cpu()
        energy = result.energy.detach().cpu().double()
        atom_slices = final.system_slices()
        for k, pair in enumerate(chunk):
            bad = bool(blew[k]) or not math.isfinite(float(dq[k]))
            e_model = float(energy[k]) if not bad else None
            e_dft = pair.energy_final
            row = {
                "name": pair.name,
                "group": pair.group,
                "n_atoms": len(pair.initial),
                "dq": None if bad else float(dq[k]),
                "rmsd": None if bad else float(rmsd[k]),
                "max_disp": None if bad else float(mx[k]),
                "basin_match": (not bad) and float(mx[k]) < BASIN_TOLERANCE,
                "steps": int(result.n_steps[k]),
                "converged": (not bad) and bool(result.converged[k]),
                "blew_up": bad,
                "energy": e_model,
                "energy_dft": e_dft,
                "energy_error_per_atom": (
                    (e_model - e_dft) / len(pair.initial) if (e_model is not None and e_dft is not None) else None
                ),
            }
            if details:
                row["displacements"] = None if bad else per_atom[atom_slices[k]].tolist()
                row["energy_trace"] = None if bad else trace[: row["steps"] + 1, k].tolist()
            if symprec is not None:
                row.update(_symmetric_row(final, k, reference, pair, symprec, bad))
            if pair.relax_cell:
                errors = cell_errors(result.batch.cell[k].detach().cpu().double().numpy(), pair.final.cell.array)
                row.update(errors if not bad else {key: None for key in errors})
            rows.append(row)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    metrics = summarize(rows)
    metrics.update({"fmax": fmax, "optimizer": optimizer, "max_steps": max_steps, "start": start,
                    "step_size": configs[False].eta})
    return Evaluation(metrics=metrics, rows=rows)
