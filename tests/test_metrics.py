"""Dq, RMSD, max displacement with minimum image: values, mass weighting, gradients."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.geometry import find_mic

from relaxtune.state import Batch
from relaxtune import metrics


def _pair(seed=0, triclinic=False):
    """A Si cell and a displaced copy in which some atoms crossed the cell faces (positions wrapped)."""
    rng = np.random.default_rng(seed)
    a = bulk("Si", "diamond", a=5.43, cubic=not triclinic) * (2, 1, 1)
    if triclinic:
        a.set_cell(a.cell.array + np.array([[0, 0, 0], [0.7, 0, 0], [0.3, 0.4, 0]]), scale_atoms=True)
    ref = a.copy()
    moved = a.copy()
    moved.positions += rng.normal(scale=0.15, size=moved.positions.shape)
    moved.positions[0] -= 0.3  # make sure one atom leaves through a face
    moved.wrap()
    ref.wrap()
    return moved, ref


@pytest.mark.parametrize("triclinic", [False, True])
def test_minimum_image_matches_ase(triclinic):
    moved, ref = _pair(triclinic=triclinic)
    b = Batch.from_atoms([moved], dtype=torch.float64)
    d = metrics.minimum_image_displacement(
        b.positions, torch.tensor(ref.positions), b.cell, b.pbc, b.system_idx
    )
    expect, _ = find_mic(moved.positions - ref.positions, moved.cell, pbc=True)
    np.testing.assert_allclose(d.numpy(), expect, atol=1e-10)
    raw = np.abs(moved.positions - ref.positions).max()
    assert raw > 1.0  # the wrap matters in this fixture


def test_dq_rmsd_maxdisp_values_and_mass_weighting():
    moved, ref = _pair()
    b = Batch.from_atoms([moved, moved], dtype=torch.float64)
    refpos = torch.tensor(np.concatenate([ref.positions, moved.positions]))
    d, _ = find_mic(moved.positions - ref.positions, moved.cell, pbc=True)
    m = moved.get_masses()
    dq = metrics.dq(b, refpos)
    np.testing.assert_allclose(dq[0].item(), np.sqrt((m[:, None] * d**2).sum()), rtol=1e-12)
    assert dq[1].item() == 0.0
    r = metrics.rmsd(b, refpos)
    np.testing.assert_allclose(r[0].item(), np.sqrt((d**2).sum(1).mean()), rtol=1e-12)
    mx = metrics.max_displacement(b, refpos)
    np.testing.assert_allclose(mx[0].item(), np.linalg.norm(d, axis=1).max(), rtol=1e-12)
    assert mx[1].item() == 0.0
    # a heavier atom weighs more: Dq over Ge = sqrt(m_Ge/m_Si) Dq over Si for the same displacements
    ge = moved.copy(); ge.set_chemical_symbols(["Ge"] * len(ge))
    ge_ref = ref.copy(); ge_ref.set_chemical_symbols(["Ge"] * len(ge))
    bg = Batch.from_atoms([ge], dtype=torch.float64)
    ratio = metrics.dq(bg, torch.tensor(ge_ref.positions)).item() / dq[0].item()
    np.testing.assert_allclose(ratio, np.sqrt(ge.get_masses()[0] / m[0]), rtol=1e-12)


def test_dq_gradcheck_with_pbc_wrap():
    moved, ref = _pair(seed=3, triclinic=True)
    b = Batch.from_atoms([moved], dtype=torch.float64)
    refpos = torch.tensor(ref.positions)
    x = b.positions.clone().requires_grad_(True)

    def f(pos):
        return metrics.dq(b.replace(positions=pos), refpos)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda p: metrics.rmsd(b.replace(positions=p), refpos), (x,), eps=1e-6, atol=1e-7)


def test_dq_zero_distance_has_finite_zero_gradient():
    moved, _ = _pair()
    b = Batch.from_atoms([moved], dtype=torch.float64)
    x = b.positions.clone().requires_grad_(True)
    metrics.dq(b.replace(positions=x), b.positions).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0
