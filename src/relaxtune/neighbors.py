"""Neighbor lists: integer topology without gradients, edge vectors with gradients.

Neighbor search is not differentiable, so the list (pair indices and integer periodic image shifts) is built
once per unroll from detached positions, and kept fixed while atoms move (they move far less than the skin).
Edge vectors are then rebuilt in torch each step from the current positions and cell, so forces, stress and
second derivatives flow through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import vesin

from relaxtune.state import Batch


@dataclass(frozen=True)
class NeighborList:
    """Directed pairs i -> j over a whole batch (global atom indices), with integer image shifts.

    The vector of pair p is ``X[j] - X[i] + shifts[p] @ cell[system_of_pair[p]]``.
    """

    i: torch.Tensor  # (n_pairs,) long
    j: torch.Tensor  # (n_pairs,) long
    shifts: torch.Tensor  # (n_pairs, 3) float, integer-valued
    system_of_pair: torch.Tensor  # (n_pairs,) long
    cutoff: float

    def vectors(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Edge vectors (n_pairs, 3) from the current (differentiable) positions and cells."""
        image = torch.einsum("pk,pkl->pl", self.shifts.to(positions.dtype), cell[self.system_of_pair])
        return positions[self.j] - positions[self.i] + image


def build_neighbor_list(batch: Batch, cutoff: float, full_list: bool = True) -> NeighborList:
    """All pairs closer than ``cutoff`` (Å), per structure, via vesin. No gradients."""
    pos = batch.positions.detach().cpu().double().numpy()
    cells = batch.cell.detach().cpu().double().numpy()
    pbc = batch.pbc.cpu().numpy()
    finder = vesin.NeighborList(cutoff=float(cutoff), full_list=full_list)
    all_i, all_j, all_s, all_sys = [], [], [], []
    for k, sl in enumerate(batch.system_slices()):
        box = cells[k] if pbc[k].any() else np.zeros((3, 3))
        i, j, s = finder.compute(points=pos[sl], box=box, periodic=pbc[k].tolist(), quantities="ijS")
        all_i.append(i.astype(np.int64) + sl.start)
        all_j.append(j.astype(np.int64) + sl.start)
        all_s.append(s.reshape(-1, 3))
        all_sys.append(np.full(len(i), k, dtype=np.int64))
    device = batch.device
    return NeighborList(
        i=torch.as_tensor(np.concatenate(all_i), device=device),
        j=torch.as_tensor(np.concatenate(all_j), device=device),
        shifts=torch.as_tensor(np.concatenate(all_s), dtype=batch.dtype, device=device),
        system_of_pair=torch.as_tensor(np.concatenate(all_sys), device=device),
        cutoff=float(cutoff),
    )
