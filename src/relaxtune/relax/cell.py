"""Cell degrees of freedom as a deformation gradient, as ASE's ``FrechetCellFilter``.

Each structure s gets a deformation gradient ``D_s = expm(L_s)`` relative to its starting cell ``C0_s``
(rows = lattice vectors): cell ``C = C0 D^T``, atom positions ``x = u D^T`` where ``u`` are the positions in the
undeformed frame. The optimizer moves generalized coordinates: the atom rows ``u`` and three rows
``N_s L_s`` per structure (``N_s`` = its atom count, ASE's ``exp_cell_factor``). Their generalized forces are

    atoms:  f D                          (f = Cartesian forces)
    cell:   Dexp_{L^T}(W D^{-T}) / N     W = -V (sigma + p I), the virial with the target pressure p,

where ``Dexp_A(E)`` is the Frechet derivative of the matrix exponential (the upper-right block of
``expm([[A, E], [0, A]])``); this is exactly ASE's ``FrechetCellFilter.get_forces``, so ASE's FIRE on the
filter and relaxtune's FIRE on these rows take the same steps. The stress comes from
``relaxtune.potentials.base.energy_and_forces(compute_stress=True)``; everything is torch, so the cell steps
are differentiable too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relaxtune.state import Batch


@dataclass(frozen=True)
class CellFilter:
    """What stays fixed while the cell relaxes: the reference cells, scale factors and the target pressure."""

    reference_cell: torch.Tensor  # (n_systems, 3, 3)
    factor: torch.Tensor  # (n_systems,) atom counts (ASE's exp_cell_factor)
    pressure: float  # eV/Å^3

    @property
    def n_systems(self) -> int:
        return int(self.reference_cell.shape[0])

    def select(self, systems: torch.Tensor) -> "CellFilter":
        return CellFilter(self.reference_cell[systems], self.factor[systems], self.pressure)


def cell_filter_init(batch: Batch, pressure: float = 0.0) -> CellFilter:
    """Cell DOFs starting from the batch's current cells (deformation = identity)."""
    return CellFilter(reference_cell=batch.cell.detach(), factor=batch.n_atoms_per_system.to(batch.dtype),
                      pressure=float(pressure))


def initial_rows(batch: Batch) -> torch.Tensor:
    """Generalized coordinates at the start: atom positions, then three zero rows (L = 0) per structure."""
    zeros = torch.zeros(3 * batch.n_systems, 3, dtype=batch.dtype, device=batch.device)
    return torch.cat([batch.positions, zeros])


def row_system(batch: Batch) -> torch.Tensor:
    """Structure of each generalized row (atoms first, then 3 cell rows per structure)."""
    cell_rows = torch.arange(batch.n_systems, device=batch.device).repeat_interleave(3)
    return torch.cat([batch.system_idx, cell_rows])


def deformation(cf: CellFilter, rows: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D = expm(L)) per structure from the cell rows."""
    log_def = rows[n_atoms:].reshape(cf.n_systems, 3, 3) / cf.factor[:, None, None]
    return log_def, torch.linalg.matrix_exp(log_def)


def apply_rows(cf: CellFilter, batch: Batch, rows: torch.Tensor) -> Batch:
    """Cartesian batch (positions ``u D^T``, cell ``C0 D^T``) for the generalized coordinates ``rows``."""
    n = batch.n_atoms
    _, deform = deformation(cf, rows, n)
    positions = torch.einsum("ak,alk->al", rows[:n], deform[batch.system_idx])
    cell = cf.reference_cell @ deform.transpose(1, 2)
    return batch.replace(positions=positions, cell=cell)


def frechet_expm(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Frechet derivative of expm at ``a`` in direction ``e`` (batched 3x3), via the 6x6 block exponential."""
    zero = torch.zeros_like(a)
    block = torch.cat([torch.cat([a, e], dim=2), torch.cat([zero, a], dim=2)], dim=1)
    return torch.linalg.matrix_exp(block)[:, :3, 3:]


def generalized_forces(cf: CellFilter, batch: Batch, rows: torch.Tensor, forces: torch.Tensor,
                       stress: torch.Tensor) -> torch.Tensor:
    """Forces on the generalized rows from Cartesian forces and stress (eV/Å^3, ASE sign) at ``apply_rows``.

    ``batch`` is the Cartesian batch (its cell is the current cell).
    """
    n = batch.n_atoms
    log_def, deform = deformation(cf, rows, n)
    eye = torch.eye(3, dtype=stress.dtype, device=stress.device)
    volume = torch.linalg.det(batch.cell).abs()
    virial = -volume[:, None, None] * (stress + cf.pressure * eye)
    # W D^{-T}: solve D G^T = W^T
    ucf_grad = torch.linalg.solve(deform, virial.transpose(1, 2)).transpose(1, 2)
    cell_forces = frechet_expm(log_def.transpose(1, 2), ucf_grad) / cf.factor[:, None, None]
    atom_forces = torch.einsum("ak,akl->al", forces, deform[batch.system_idx])
    return torch.cat([atom_forces, cell_forces.reshape(-1, 3)])
