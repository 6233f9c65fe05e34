"""CHGNet adapter vs CHGNet's own ASE calculator (energy, forces, stress), batching, and derivatives."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.stress import voigt_6_to_full_3x3_stress

from relaxtune.potentials.base import UnsupportedElementError, energy_and_forces
from relaxtune.potentials.chgnet import CHGNetModel
from relaxtune.state import Batch

from helpers import assert_energy_forces_gradcheck

STRAIN = np.array([[1.02, 0.01, 0.0], [0.01, 0.985, 0.005], [0.0, 0.005, 1.01]])


@pytest.fixture(scope="module")
def model():
    return CHGNetModel()


@pytest.fixture(scope="module")
def reference(model):
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(model=model.model, use_device="cpu")


def si8():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def gaas():
    atoms = bulk("GaAs", "zincblende", a=5.65)
    atoms.rattle(0.05, seed=2)
    return atoms


def strained_si8():
    atoms = si8()
    atoms.set_cell(atoms.cell.array @ STRAIN, scale_atoms=True)
    return atoms


def test_matches_chgnet_calculator(model, reference):
    structures = [si8(), gaas(), strained_si8()]
    batch = Batch.from_atoms(structures)
    out = energy_and_forces(model, batch, model.prepare(batch), compute_stress=True)
    for k, (atoms, sl) in enumerate(zip(structures, batch.system_slices())):
        atoms = atoms.copy()
        atoms.calc = reference
        # CHGNet predicts eV/atom; the adapter returns the total (x n_atoms, composition model included)
        assert out.energy[k].item() / len(atoms) == pytest.approx(atoms.get_potential_energy() / len(atoms), abs=1e-4)
        np.testing.assert_allclose(out.forces[sl].double().numpy(), atoms.get_forces(), atol=1e-4)
        # CHGNetCalculator converts its GPa to eV/Å^3 with ASE's sign (positive = tensile), as we do
        ref_stress = voigt_6_to_full_3x3_stress(atoms.get_stress())
        assert np.abs(ref_stress).max() > 5e-3  # the strained cell really is stressed
        np.testing.assert_allclose(out.stress[k].double().numpy(), ref_stress, atol=2e-5)


def test_batched_equals_one_by_one(model):
    structures = [si8(), gaas(), strained_si8()]
    batch = Batch.from_atoms(structures)
    together = energy_and_forces(model, batch, model.prepare(batch), compute_stress=True)
    for k, (atoms, sl) in enumerate(zip(structures, batch.system_slices())):
        single = Batch.from_atoms([atoms])
        alone = energy_and_forces(model, single, model.prepare(single), compute_stress=True)
        assert together.energy[k].item() == pytest.approx(alone.energy[0].item(), abs=1e-4)
        torch.testing.assert_close(together.forces[sl], alone.forces, atol=1e-5, rtol=0)
        torch.testing.assert_close(together.stress[k], alone.stress[0], atol=1e-6, rtol=0)


def test_forces_follow_positions_with_fixed_topology(model, reference):
    batch = Batch.from_atoms([si8()])
    prepared = model.prepare(batch)
    before = energy_and_forces(model, batch, prepared)
    moved = batch.replace(positions=batch.positions + 0.03 * torch.randn_like(batch.positions))
    after = energy_and_forces(model, moved, prepared)  # same graph, new positions
    assert (after.forces - before.forces).abs().max() > 1e-2
    atoms = moved.to_atoms()[0]
    atoms.calc = reference
    np.testing.assert_allclose(after.forces.double().numpy(), atoms.get_forces(), atol=1e-4)


def test_second_derivatives_reach_parameters(model):
    batch = Batch.from_atoms([si8()])
    out = energy_and_forces(model, batch, model.prepare(batch), create_graph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.forces**2).sum(), params, allow_unused=True)
    total = sum(g.abs().sum() for g in grads if g is not None)
    assert torch.isfinite(total) and total > 0
    assert sum(g is not None for g in grads) > len(params) // 2


def test_gradcheck_float64():
    """Energy -> forces (first) and Hessian (second derivative) vs finite differences, positions and cell."""
    assert_energy_forces_gradcheck(CHGNetModel(dtype=torch.float64))


def test_unsupported_element(model):
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.numbers[:] = 95  # americium: beyond CHGNet's 94 elements
    with pytest.raises(UnsupportedElementError, match="Am"):
        model.prepare(Batch.from_atoms([atoms]))


def test_padded_graph_is_exact_until_atoms_move_half_the_skin():
    """The graph built with CHGNet's cutoffs plus the skin, kept while atoms move up to skin / 2, gives the
    energy and forces of a graph built afresh at the new positions (float64)."""
    from relaxtune.data.builders import rattle, si_defect

    padded, fresh = CHGNetModel(dtype=torch.float64), CHGNetModel(dtype=torch.float64, skin=0.0)
    batch = Batch.from_atoms([rattle(si_defect("vacancy"), 0.05, 1), si8()], dtype=torch.float64)
    kept = padded.prepare(batch)
    step = torch.from_numpy(np.random.default_rng(0).normal(size=tuple(batch.positions.shape)))
    step = 0.24 * padded.skin * step / torch.linalg.vector_norm(step, dim=-1, keepdim=True)  # every atom ~skin/2
    moved = batch.replace(positions=batch.positions + step)
    old = energy_and_forces(fresh, moved, fresh.prepare(batch))  # the unpadded graph of the old positions
    got = energy_and_forces(padded, moved, kept)
    want = energy_and_forces(fresh, moved, fresh.prepare(moved))
    torch.testing.assert_close(got.energy, want.energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.forces, want.forces, rtol=0, atol=1e-9)
    assert float((old.forces - want.forces).abs().max()) > 1e-4  # without the skin the stale graph is not exact


def test_declared_module_roles_name_modules_of_the_network(model):
    modules = {c for n, _ in model.named_modules() for c in n.split(".")}
    for role in ("readout_modules", "embedding_modules", "element_embedding_modules"):
        declared = getattr(model, role)
        assert declared and set(declared) <= modules, role
