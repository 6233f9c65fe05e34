"""Distances up to a symmetry of the starting structure.

A defect can break the symmetry of its starting site in several equivalent ways (an interstitial leaves a
tetrahedral site along one of four equivalent directions, a vacancy distorts along one of three axes), and which
one a relaxation takes is decided by the rattle of the starting positions, DFT's as much as a model's. Dq
against one DFT relaxation charges an equivalent orientation as much as a wrong structure. Here the model's
relaxed structure is compared with DFT's under every space-group operation of the *initial* structure (spglib
at a tolerance loose enough to see through the rattle), each acting as a permutation of the atoms, and the
smallest Dq is kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import spglib
import torch
from ase import Atoms

from relaxtune.state import Batch
from relaxtune import metrics


@dataclass(frozen=True)
class SymmetryOperations:
    """Operations of one structure, acting on fractional coordinates: ``f' = f @ rotations[o].T +
    translations[o]``; atom ``i`` lands on atom ``permutations[o, i]`` of the same species."""

    rotations: np.ndarray  # (n_ops, 3, 3) int
    translations: np.ndarray  # (n_ops, 3)
    permutations: np.ndarray  # (n_ops, n_atoms) int

    def __len__(self) -> int:
        return len(self.rotations)


def identity(n_atoms: int) -> SymmetryOperations:
    return SymmetryOperations(np.eye(3, dtype=int)[None], np.zeros((1, 3)), np.arange(n_atoms)[None])


def _wrapped_distances(frac_a: np.ndarray, frac_b: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Minimum-image distances (Å) between every atom of ``frac_a`` and every atom of ``frac_b``."""
    d = frac_a[:, None, :] - frac_b[None, :, :]
    d -= np.round(d)
    return np.linalg.norm(d @ cell, axis=-1)


def symmetry_operations(atoms: Atoms, symprec: float) -> SymmetryOperations:
    """The space-group operations spglib finds for ``atoms`` at ``symprec`` (Å) that map every atom onto a
    distinct atom of the same species within ``2 * symprec``; the identity alone when there are none."""
    frac = atoms.get_scaled_positions()
    cell = atoms.cell.array
    numbers = atoms.get_atomic_numbers()
    with warnings.catch_warnings():  # spglib's notice about its error handling, which other packages set
        warnings.simplefilter("ignore", DeprecationWarning)
        found = spglib.get_symmetry((cell, frac, numbers), symprec=symprec)
    if not found:
        return identity(len(atoms))
    rotations, translations, permutations = [], [], []
    other_species = numbers[:, None] != numbers[None, :]
    for rotation, translation in zip(found["rotations"], found["translations"]):
        distances = _wrapped_distances(frac @ rotation.T + translation, frac, cell)
        distances[other_species] = np.inf
        target = distances.argmin(axis=1)
        if distances[np.arange(len(frac)), target].max() > 2 * symprec or len(set(target)) != len(target):
            continue
        rotations.append(rotation)
        translations.append(translation)
        permutations.append(target)
    if not rotations:
        return identity(len(atoms))
    return SymmetryOperations(np.array(rotations), np.array(translations), np.array(permutations))


def symmetric_images(positions: np.ndarray, cell: np.ndarray, ops: SymmetryOperations) -> np.ndarray:
    """(n_ops, n_atoms, 3) Cartesian positions of each operation applied to ``positions``, atoms renumbered
    so that row ``j`` of an image is the atom that lands on atom ``j``'s site."""
    frac = np.linalg.solve(cell.T, positions.T).T
    images = np.empty((len(ops), *positions.shape))
    for o in range(len(ops)):
        images[o, ops.permutations[o]] = (frac @ ops.rotations[o].T + ops.translations[o]) @ cell
    return images


def symmetric_distance(final: Batch, system: int, reference: torch.Tensor,
                       ops: SymmetryOperations) -> tuple[float, float]:
    """(Dq, max displacement) of structure ``system`` of ``final`` against ``reference`` (its atoms' reference
    positions), minimised over ``ops``: the Dq of the operation closest to the reference, and that
    operation's max displacement."""
    one = final.select([system])
    images = symmetric_images(one.positions.detach().cpu().double().numpy(),
                              one.cell[0].detach().cpu().double().numpy(), ops)
    copies = final.select([system] * len(ops))
    copies = copies.replace(positions=torch.as_tensor(images.reshape(-1, 3), dtype=final.dtype, device=final.device))
    references = reference.repeat(len(ops), 1)
    with torch.no_grad():
        dq = metrics.dq(copies, references)
        max_disp = metrics.max_displacement(copies, references)
    best = int(torch.argmin(dq))
    return float(dq[best]), float(max_disp[best])
