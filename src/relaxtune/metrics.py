"""How far a relaxed structure lies from its reference, per structure, differentiable in the positions.

``Dq = sqrt(sum_j m_j |x*_j - x^_j|^2)`` (masses in amu, positions in Å, so Dq is in sqrt(amu)·Å), RMSD and max
displacement (Å), all on minimum-image displacements: under periodic boundaries an atom that crossed the cell
face is compared with the nearest image of its reference. The image shift is an integer choice computed on
detached values (it is piecewise constant), the displacement itself stays differentiable in the positions.
Training losses (``relaxtune.train.losses``), evaluation, symmetry and the report all measure with these.
"""

from __future__ import annotations

import torch

from relaxtune.state import Batch, per_system_max, per_system_sum


def minimum_image_displacement(
    positions: torch.Tensor,
    reference: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
) -> torch.Tensor:
    """``positions - reference`` (n_atoms, 3) wrapped to the nearest periodic image along periodic axes.

    The wrap ``round(frac)`` is taken from detached values, so the result is differentiable in ``positions``
    (and ``reference``) with the same derivative as the plain difference.
    """
    diff = positions - reference
    cell_a = cell[system_idx].to(diff.dtype)  # (n_atoms, 3, 3)
    with torch.no_grad():
        frac = torch.linalg.solve(cell_a.transpose(1, 2), diff.detach().unsqueeze(-1)).squeeze(-1)
        periodic = pbc[system_idx].to(diff.dtype)
        shift = torch.round(frac) * periodic
    return diff - torch.einsum("ak,akl->al", shift, cell_a.detach())


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite gradient at 0 (a structure exactly on its reference gets zero gradient, not NaN)."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, torch.sqrt(safe), torch.zeros_like(x))


def _free(batch: Batch) -> torch.Tensor:
    return (~batch.fixed).to(batch.positions.dtype)


def dq(batch: Batch, reference_positions: torch.Tensor) -> torch.Tensor:
    """Mass-weighted distance per structure (n_systems,), sqrt(amu)·Å, over all atoms (fixed ones add 0
    when they sit on their reference)."""
    d = minimum_image_displacement(batch.positions, reference_positions, batch.cell, batch.pbc, batch.system_idx)
    sq = batch.masses.to(d.dtype) * (d * d).sum(-1)
    return safe_sqrt(per_system_sum(sq, batch.system_idx, batch.n_systems))


def rmsd(batch: Batch, reference_positions: torch.Tensor) -> torch.Tensor:
    """Root-mean-square displacement per structure (n_systems,), Å."""
    d = minimum_image_displacement(batch.positions, reference_positions, batch.cell, batch.pbc, batch.system_idx)
    sq = per_system_sum((d * d).sum(-1), batch.system_idx, batch.n_systems)
    n = batch.n_atoms_per_system.to(d.dtype)
    return safe_sqrt(sq / n)


def max_displacement(batch: Batch, reference_positions: torch.Tensor) -> torch.Tensor:
    """Largest per-atom displacement per structure (n_systems,), Å."""
    d = minimum_image_displacement(batch.positions, reference_positions, batch.cell, batch.pbc, batch.system_idx)
    return per_system_max(safe_sqrt((d * d).sum(-1)), batch.system_idx, batch.n_systems)
