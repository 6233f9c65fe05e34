"""Cell degrees of freedom: same coordinates and generalized forces as ASE's FrechetCellFilter, consistent with
the enthalpy gradient, and cell relaxations that land where ASE's do."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from matscipy.calculators.manybody import Manybody
from matscipy.calculators.manybody import StillingerWeber as MatscipySW
from matscipy.calculators.manybody.explicit_forms.stillinger_weber import Stillinger_Weber_PRB_31_5262_Si

from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.relax import RelaxConfig, relax
from relaxtune.relax.cell import (apply_rows, cell_filter_init, frechet_expm, generalized_forces, initial_rows,
                                  row_system)
from relaxtune.state import Batch


def _sw_calc():
    return Manybody(**MatscipySW(Stillinger_Weber_PRB_31_5262_Si))


def _strained_si():
    a = bulk("Si", "diamond", a=5.30, cubic=True)
    a.rattle(0.05, seed=1)
    a.set_cell(a.cell.array @ np.array([[1.02, 0.01, 0.0], [0.0, 0.99, 0.0], [0.01, 0.0, 1.0]]), scale_atoms=True)
    b = bulk("Si", "diamond", a=5.60)
    b.rattle(0.05, seed=2)
    return [a, b]


def _deformed_rows(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = initial_rows(batch).clone()
    rows[: batch.n_atoms] += 0.03 * torch.randn(batch.n_atoms, 3, generator=g, dtype=batch.dtype)
    factors = batch.n_atoms_per_system.to(batch.dtype).repeat_interleave(3)
    rows[batch.n_atoms:] = 0.02 * torch.randn(3 * batch.n_systems, 3, generator=g, dtype=batch.dtype) * factors[:, None]
    return rows


@pytest.mark.parametrize("pressure", [0.0, 0.02])
def test_coordinates_and_forces_match_ase_frechet_filter(pressure):
    structures = _strained_si()
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    model = StillingerWeber().double()
    cf = cell_filter_init(batch, pressure)
    rows = _deformed_rows(batch)
    cart = apply_rows(cf, batch, rows)
    out = energy_and_forces(model, cart, model.prepare(cart), compute_stress=True)
    gen = generalized_forces(cf, cart, rows, out.forces, out.stress)
    rsys = row_system(batch)
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = _sw_calc()
        filt = FrechetCellFilter(atoms, scalar_pressure=pressure)
        mine = torch.cat([rows[: batch.n_atoms][batch.system_idx == k], rows[batch.n_atoms:][rsys[batch.n_atoms:] == k]])
        # ASE stores N logm(N D) in its cell rows (its deformation is expm(rows / N) / N): same DOFs shifted by
        # N log(N) I, which FIRE never sees (it only uses differences)
        n = len(atoms)
        ase_rows = mine.numpy().copy()
        ase_rows[n:] += n * np.log(n) * np.eye(3)
        filt.set_positions(ase_rows)
        np.testing.assert_allclose(atoms.positions, cart.positions[batch.system_idx == k].numpy(), atol=1e-12)
        np.testing.assert_allclose(atoms.cell.array, cart.cell[k].numpy(), atol=1e-12)
        np.testing.assert_allclose(filt.get_positions(), ase_rows, atol=1e-10)
        theirs = filt.get_forces()
        ours = torch.cat([gen[: batch.n_atoms][batch.system_idx == k], gen[batch.n_atoms:][rsys[batch.n_atoms:] == k]])
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-9)


def test_generalized_forces_are_minus_enthalpy_gradient():
    """-d(E + pV)/d(rows) by autograd equals the closed form (Frechet derivative of expm included)."""
    batch = Batch.from_atoms(_strained_si(), dtype=torch.float64)
    model = StillingerWeber().double()
    cf = cell_filter_init(batch, pressure=0.01)
    rows = _deformed_rows(batch, seed=3).requires_grad_(True)
    cart = apply_rows(cf, batch, rows)
    prep = model.prepare(cart)
    enthalpy = model.energy(cart, prep) + cf.pressure * torch.linalg.det(cart.cell).abs()
    grad = torch.autograd.grad(enthalpy.sum(), rows)[0]
    out = energy_and_forces(model, cart, prep, compute_stress=True)
    gen = generalized_forces(cf, cart, rows, out.forces, out.stress)
    assert torch.allclose(gen, -grad, atol=1e-10)


def test_frechet_expm_matches_finite_difference():
    a = torch.randn(2, 3, 3, dtype=torch.float64) * 0.3
    e = torch.randn(2, 3, 3, dtype=torch.float64)
    h = 1e-6
    fd = (torch.linalg.matrix_exp(a + h * e) - torch.linalg.matrix_exp(a - h * e)) / (2 * h)
    assert torch.allclose(frechet_expm(a, e), fd, atol=1e-8)


def test_cell_relaxation_reaches_sw_lattice_constant_and_matches_ase(sw_calc):
    """FIRE + cell DOFs on SW: a -> 5.431 Å, and the same structures and step counts as ASE FIRE on
    FrechetCellFilter, also with a fixed atom."""
    structures = _strained_si()
    structures[1].set_constraint(FixAtoms([0]))
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    model = StillingerWeber().double()
    res = relax(model, batch, RelaxConfig(fmax=1e-3, relax_cell=True, max_steps=400))
    assert res.converged.all()
    assert res.stress is not None and res.stress.abs().max() < 1e-4
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = sw_calc()
        opt = FIRE(FrechetCellFilter(atoms), logfile=None)
        opt.run(fmax=1e-3, steps=400)
        assert res.n_steps[k].item() == opt.nsteps
        np.testing.assert_allclose(res.batch.cell[k].numpy(), atoms.cell.array, atol=1e-8)
        np.testing.assert_allclose(res.batch.positions[batch.system_idx == k].numpy(), atoms.positions, atol=1e-8)
        volume_per_atom = abs(np.linalg.det(res.batch.cell[k].numpy())) / len(atoms)
        assert (8 * volume_per_atom) ** (1 / 3) == pytest.approx(5.431, abs=2e-3)
    # the fixed atom moved only with the cell (its fractional coordinates are unchanged)
    k = 1
    frac0 = structures[1].get_scaled_positions(wrap=False)[0]
    frac1 = np.linalg.solve(res.batch.cell[k].numpy().T, res.batch.positions[batch.system_idx == k][0].numpy())
    np.testing.assert_allclose(frac1, frac0, atol=1e-12)


def test_pressure_shrinks_the_cell():
    batch = Batch.from_atoms(bulk("Si", "diamond", a=5.431, cubic=True), dtype=torch.float64)
    model = StillingerWeber().double()
    res = relax(model, batch, RelaxConfig(fmax=1e-3, relax_cell=True, pressure=0.02, max_steps=300))
    assert res.converged.all()
    pressure = -torch.trace(res.stress[0]).item() / 3
    assert pressure == pytest.approx(0.02, abs=2e-4)
    assert torch.linalg.det(res.batch.cell[0]).item() < 5.431**3 - 1.0
