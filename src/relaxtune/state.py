"""Batched state of many periodic structures, and its round trip to ASE ``Atoms``.

One flat tensor of positions for all atoms (``system_idx`` says which structure each atom belongs to), one
cell per structure. Structures of different sizes and species share a batch. The state is immutable: code
that moves atoms builds a new ``Batch`` with ``Batch.replace``, so autograd graphs stay intact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms


@dataclass(frozen=True)
class Batch:
    """Many structures in flat tensors.

    positions: (n_atoms, 3) Cartesian, Å.  cell: (n_systems, 3, 3), rows are lattice vectors, Å.
    pbc: (n_systems, 3) bool.  numbers: (n_atoms,) atomic numbers.  masses: (n_atoms,) amu.
    system_idx: (n_atoms,) index of each atom's structure, sorted.  fixed: (n_atoms,) bool, atoms that never move.
    """

    positions: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    numbers: torch.Tensor
    masses: torch.Tensor
    system_idx: torch.Tensor
    fixed: torch.Tensor

    @property
    def n_systems(self) -> int:
        return int(self.cell.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms_per_system(self) -> torch.Tensor:
        return torch.bincount(self.system_idx, minlength=self.n_systems)

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def replace(self, **changes: torch.Tensor) -> "Batch":
        """A new batch with some fields swapped (the old one is untouched)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Batch":
        """Move to a device and/or cast the floating fields to ``dtype``."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        return Batch(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def system_slices(self) -> list[slice]:
        """Atom index range of each structure."""
        counts = self.n_atoms_per_system.tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        return [slice(int(starts[i]), int(starts[i + 1])) for i in range(len(counts))]

    def select(self, systems: Sequence[int] | torch.Tensor) -> "Batch":
        """A batch of a subset of the structures, in the given order (re-indexed from 0)."""
        systems = torch.as_tensor(systems, dtype=torch.long, device=self.device).reshape(-1)
        slices = self.system_slices()
        atom_idx = torch.cat([torch.arange(slices[s].start, slices[s].stop, device=self.device) for s in systems.tolist()])
        new_sys = torch.cat([
            torch.full((slices[s].stop - slices[s].start,), k, dtype=torch.long, device=self.device)
            for k, s in enumerate(systems.tolist())
        ])
        return Batch(
            positions=self.positions[atom_idx], cell=self.cell[systems], pbc=self.pbc[systems],
            numbers=self.numbers[atom_idx], masses=self.masses[atom_idx], system_idx=new_sys,
            fixed=self.fixed[atom_idx],
        )

    def concat(self, other: "Batch") -> "Batch":
        """This batch's structures followed by ``other``'s (the inverse of ``select``)."""
        joined = {f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)])
                  for f in dataclasses.fields(Batch) if f.name != "system_idx"}
        return Batch(**joined, system_idx=torch.cat([self.system_idx, other.system_idx + self.n_systems]))

    @classmethod
    def from_atoms(
        cls,
        structures: Atoms | Sequence[Atoms],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "Batch":
        """Stack ASE structures into one batch. ``FixAtoms`` constraints become the ``fixed`` mask."""
        if isinstance(structures, Atoms):
            structures = [structures]
        if len(structures) == 0:
            raise ValueError("cannot build a batch from zero structures")
        positions, cells, pbcs, numbers, masses, sys_idx, fixed = [], [], [], [], [], [], []
        for i, atoms in enumerate(structures):
            n = len(atoms)
            positions.append(atoms.get_positions())
            cells.append(np.asarray(atoms.get_cell()))
            pbcs.append(atoms.get_pbc())
            numbers.append(atoms.get_atomic_numbers())
            masses.append(atoms.get_masses())
            sys_idx.append(np.full(n, i))
            mask = np.zeros(n, dtype=bool)
            for c in atoms.constraints:
                if isinstance(c, FixAtoms):
                    mask[c.get_indices()] = True
            fixed.append(mask)
        as_float = dict(dtype=dtype, device=device)
        return cls(
            positions=torch.tensor(np.concatenate(positions), **as_float),
            cell=torch.tensor(np.stack(cells), **as_float),
            pbc=torch.tensor(np.stack(pbcs), dtype=torch.bool, device=device),
            numbers=torch.tensor(np.concatenate(numbers), dtype=torch.long, device=device),
            masses=torch.tensor(np.concatenate(masses), **as_float),
            system_idx=torch.tensor(np.concatenate(sys_idx), dtype=torch.long, device=device),
            fixed=torch.tensor(np.concatenate(fixed), dtype=torch.bool, device=device),
        )

    def to_atoms(self) -> list[Atoms]:
        """One ASE ``Atoms`` per structure (detached, float64 numpy)."""
        out = []
        pos = self.positions.detach().cpu().double().numpy()
        cell = self.cell.detach().cpu().double().numpy()
        pbc = self.pbc.cpu().numpy()
        numbers = self.numbers.cpu().numpy()
        fixed = self.fixed.cpu().numpy()
        for i, sl in enumerate(self.system_slices()):
            atoms = Atoms(numbers=numbers[sl], positions=pos[sl], cell=cell[i], pbc=pbc[i])
            if fixed[sl].any():
                atoms.set_constraint(FixAtoms(indices=np.nonzero(fixed[sl])[0]))
            out.append(atoms)
        return out


def per_system_sum(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Sum per-atom values (n_atoms, ...) into per-structure values (n_systems, ...)."""
    out = torch.zeros((n_systems,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, system_idx, values)


def per_system_max(values: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Max of per-atom scalars (n_atoms,) within each structure (n_systems,)."""
    out = torch.full((n_systems,), -torch.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, system_idx, values, reduce="amax", include_self=True)
