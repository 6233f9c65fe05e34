"""SevenNet-0 adapter vs sevenn's own ASE calculator, batching, derivatives, and forces that follow positions.

SevenNet's calculator builds edge vectors in numpy; the adapter builds them in torch from positions and cell.
The decisive check is that forces evaluated on moved positions with the *same* prepared topology change and
match the calculator at the moved positions (otherwise a relaxation would see frozen forces).
"""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.stress import voigt_6_to_full_3x3_stress

from relaxtune.potentials.base import UnsupportedElementError, energy_and_forces
from relaxtune.potentials.sevennet import SevenNetModel
from relaxtune.state import Batch

from helpers import assert_energy_forces_gradcheck


@pytest.fixture(scope="module")
def model():
    return SevenNetModel()


@pytest.fixture(scope="module")
def reference():
    import warnings

    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SevenNetCalculator("7net-0", device="cpu")


def si8():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def gaas():
    atoms = bulk("GaAs", "zincblende", a=5.65)
    atoms.rattle(0.05, seed=2)
    atoms.set_cell(atoms.cell.array @ np.array([[1.02, 0.01, 0.0], [0.01, 0.985, 0.0], [0.0, 0.0, 1.01]]),
                   scale_atoms=True)
    return atoms


def test_supported_species_from_checkpoint(model):
    assert len(model.supported_numbers) == 89 and 14 in model.supported_numbers
    assert 84 not in model.supported_numbers
    assert model.cutoff == pytest.approx(5.0)


def test_matches_sevennet_calculator(model, reference):
    structures = [si8(), gaas()]
    batch = Batch.from_atoms(structures)
    out = energy_and_forces(model, batch, model.prepare(batch), compute_stress=True)
    for k, (atoms, sl) in enumerate(zip(structures, batch.system_slices())):
        atoms = atoms.copy()
        atoms.calc = reference
        assert out.energy[k].item() / len(atoms) == pytest.approx(atoms.get_potential_energy() / len(atoms), abs=1e-4)
        np.testing.assert_allclose(out.forces[sl].double().numpy(), atoms.get_forces(), atol=1e-4)
        np.testing.assert_allclose(out.stress[k].double().numpy(), voigt_6_to_full_3x3_stress(atoms.get_stress()),
                                   atol=2e-5)


def test_batched_equals_one_by_one(model):
    structures = [si8(), gaas()]
    batch = Batch.from_atoms(structures)
    together = energy_and_forces(model, batch, model.prepare(batch))
    for k, (atoms, sl) in enumerate(zip(structures, batch.system_slices())):
        single = Batch.from_atoms([atoms])
        alone = energy_and_forces(model, single, model.prepare(single))
        assert together.energy[k].item() == pytest.approx(alone.energy[0].item(), abs=1e-4)
        torch.testing.assert_close(together.forces[sl], alone.forces, atol=1e-5, rtol=0)


def test_forces_follow_positions_with_fixed_topology(model, reference):
    batch = Batch.from_atoms([si8()])
    prepared = model.prepare(batch)
    before = energy_and_forces(model, batch, prepared)
    moved = batch.replace(positions=batch.positions + 0.03 * torch.randn_like(batch.positions))
    after = energy_and_forces(model, moved, prepared)  # same neighbor list, new positions
    assert (after.forces - before.forces).abs().max() > 1e-2
    atoms = moved.to_atoms()[0]
    atoms.calc = reference
    np.testing.assert_allclose(after.forces.double().numpy(), atoms.get_forces(), atol=1e-4)


def test_second_derivatives_reach_parameters(model):
    batch = Batch.from_atoms([bulk("Si", "diamond", a=5.43)])
    batch = batch.replace(positions=batch.positions + 0.05 * torch.randn_like(batch.positions))
    out = energy_and_forces(model, batch, model.prepare(batch), create_graph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.forces**2).sum(), params, allow_unused=True)
    total = sum(g.abs().sum() for g in grads if g is not None)
    assert torch.isfinite(total) and total > 0


def test_gradcheck_float64(model):
    """Forces are the exact derivative of the energy (positions and cell), and so is the Hessian."""
    assert_energy_forces_gradcheck(SevenNetModel(model.net, dtype=torch.float64))  # float64 copy


def test_unsupported_element(model):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.numbers[0] = 84  # polonium is not among SevenNet-0's species
    with pytest.raises(UnsupportedElementError, match="Po"):
        model.prepare(Batch.from_atoms([atoms]))


def test_state_dict_round_trip_between_copies(model):
    """Fine-tuned weights saved from one instance load into another (deep copies add e3nn fx constants)."""
    tuned = SevenNetModel(model.net)
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.01)
    fresh = SevenNetModel(model.net)
    fresh.load_state_dict(tuned.state_dict())
    batch = Batch.from_atoms([si8()])
    prepared = tuned.prepare(batch)
    e_tuned, e_fresh, e_orig = (m.energy(batch, prepared).item() for m in (tuned, fresh, model))
    assert e_fresh == pytest.approx(e_tuned, abs=1e-5) and abs(e_tuned - e_orig) > 1e-3


def test_padded_neighbour_list_is_exact_until_atoms_move_half_the_skin():
    """Pairs listed within cutoff + skin and masked beyond the cutoff give, while atoms move up to skin / 2, the
    energy and forces of a list built afresh at the new positions (float64)."""
    padded, fresh = SevenNetModel(dtype=torch.float64), SevenNetModel(dtype=torch.float64, skin=0.0)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=3)
    batch = Batch.from_atoms([atoms, si8()], dtype=torch.float64)
    kept = padded.prepare(batch)
    step = torch.from_numpy(np.random.default_rng(0).normal(size=tuple(batch.positions.shape)))
    step = 0.24 * padded.skin * step / torch.linalg.vector_norm(step, dim=-1, keepdim=True)
    moved = batch.replace(positions=batch.positions + step)
    got = energy_and_forces(padded, moved, kept)
    want = energy_and_forces(fresh, moved, fresh.prepare(moved))
    torch.testing.assert_close(got.energy, want.energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.forces, want.forces, rtol=0, atol=1e-9)
    assert padded.prepare(batch).neighbors.i.shape[0] > fresh.prepare(batch).neighbors.i.shape[0]  # padded


def test_declared_module_roles_name_modules_of_the_network(model):
    modules = {c for n, _ in model.named_modules() for c in n.split(".")}
    for role in ("readout_modules", "embedding_modules", "element_embedding_modules"):
        declared = getattr(model, role)
        assert declared and set(declared) <= modules, role
