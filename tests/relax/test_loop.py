"""The unrolled loop: gradients (gradcheck, checkpoint == full, truncated), per-structure convergence and
freezing, fixed atoms, blow-ups, the inference path, and parity with ASE FIRE (SW exactly, CHGNet <= 0.02 Å)."""

import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.constraints import FixAtoms
from ase.optimize import FIRE

from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.classical import LennardJones, StillingerWeber
from relaxtune.relax import RelaxConfig, StepParameters, relax
from relaxtune.state import Batch


def _swap(module, name, tensor):
    """Replace a registered parameter by an arbitrary tensor (so gradcheck can feed its own inputs)."""
    delattr(module, name)
    setattr(module, name, tensor)


def _si8(a=5.40, rattle=0.08, seed=1):
    atoms = bulk("Si", "diamond", a=a, cubic=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def _mixed_batch():
    """Different sizes in one batch: 8-atom, 2-atom and a 63-atom vacancy cell."""
    big = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    del big[0]
    big.rattle(0.05, seed=3)
    prim = bulk("Si", "diamond", a=5.431)
    prim.rattle(0.05, seed=4)
    return [_si8(), prim, big]


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("optimizer", ["gd", "fire"])
@pytest.mark.parametrize("relax_cell", [False, True])
def test_gradcheck_through_steps(optimizer, relax_cell):
    """d(final positions, energy, cell)/d(step size, SW lambda, initial positions) through 6 steps, float64."""
    base = Batch.from_atoms([_si8()], dtype=torch.float64)
    cfg = RelaxConfig(optimizer=optimizer, fmax=1e-9, max_steps=6, relax_cell=relax_cell,
                      momentum=0.3 if optimizer == "gd" else 0.0, anneal=0.95, max_displacement=0.05, maxstep=0.1)
    proj = torch.randn(base.n_atoms * 3, 3, dtype=torch.float64)

    def fn(log_eta, lam, pos):
        model = StillingerWeber().double()
        _swap(model, "lambda1", lam)
        sp = StepParameters(step_size=0.1)
        _swap(sp, "log_step_size", log_eta)
        res = relax(model, base.replace(positions=pos), cfg, step_params=sp, grad_mode="full")
        assert int(res.n_steps) == 6
        return torch.cat([res.batch.positions.reshape(-1) @ proj, res.energy, res.batch.cell.reshape(-1)[:3]])

    eta = 0.02 if optimizer == "gd" else 0.1
    inputs = (torch.tensor(math.log(eta), dtype=torch.float64, requires_grad=True),
              torch.tensor(21.0, dtype=torch.float64, requires_grad=True),
              base.positions.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


class _CountingSW(StillingerWeber):
    calls = 0

    def energy(self, batch, prepared):
        type(self).calls += 1
        return super().energy(batch, prepared)


@pytest.mark.parametrize("optimizer,relax_cell", [("fire", True), ("gd", False)])
def test_checkpoint_gives_full_gradient_and_recomputes(optimizer, relax_cell):
    structures = _mixed_batch()[:2]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    cfg = RelaxConfig(optimizer=optimizer, fmax=0.02, max_steps=25, relax_cell=relax_cell)

    def grads(mode, **kw):
        model = _CountingSW().double()
        sp = StepParameters(step_size=0.1 if optimizer == "fire" else 0.02)
        pos = batch.positions.clone().requires_grad_(True)
        res = relax(model, batch.replace(positions=pos), cfg, step_params=sp, grad_mode=mode, **kw)
        loss = (res.batch.positions**2).sum() + res.energy.sum()
        _CountingSW.calls = 0
        params = [pos, sp.log_step_size, model.lambda1, model.sigma]
        g = torch.autograd.grad(loss, params)
        return g, _CountingSW.calls, res

    g_full, calls_full, res_full = grads("full")
    g_ck, calls_ck, res_ck = grads("checkpoint", checkpoint_every=4)
    assert torch.equal(res_full.n_steps, res_ck.n_steps) and res_full.n_steps.max() > 8
    assert calls_full == 0 and calls_ck > 0  # the checkpointed blocks were recomputed in backward
    for a, b in zip(g_full, g_ck):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(a).all() and a.abs().max() > 0


def test_truncated_is_full_bptt_of_the_last_steps():
    """GD without momentum/anneal has no state but positions: the truncated gradient equals full BPTT through
    m steps started from the (detached) structure reached after T - m steps."""
    batch = Batch.from_atoms([_si8(rattle=0.1)], dtype=torch.float64)
    T, m = 12, 4
    cfg = RelaxConfig(optimizer="gd", fmax=1e-9, max_steps=T, max_displacement=0.1)

    def loss_and_grads(res, model, sp):
        loss = (res.batch.positions**2).sum()
        return torch.autograd.grad(loss, [model.lambda1, sp.log_step_size])

    model, sp = StillingerWeber().double(), StepParameters(0.02)
    g_trunc = loss_and_grads(relax(model, batch, cfg, step_params=sp, grad_mode="truncated", truncate_steps=m),
                             model, sp)
    mid = relax(StillingerWeber().double(), batch, RelaxConfig(optimizer="gd", fmax=1e-9, max_steps=T - m,
                                                               max_displacement=0.1))
    model, sp = StillingerWeber().double(), StepParameters(0.02)
    cfg_m = RelaxConfig(optimizer="gd", fmax=1e-9, max_steps=m, max_displacement=0.1)
    g_ref = loss_and_grads(relax(model, mid.batch, cfg_m, step_params=sp, grad_mode="full"), model, sp)
    for a, b in zip(g_trunc, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # a window longer than the relaxation is exactly full BPTT
    model, sp = StillingerWeber().double(), StepParameters(0.02)
    g_long = loss_and_grads(relax(model, batch, cfg, step_params=sp, grad_mode="truncated", truncate_steps=50),
                            model, sp)
    model, sp = StillingerWeber().double(), StepParameters(0.02)
    g_full = loss_and_grads(relax(model, batch, cfg, step_params=sp, grad_mode="full"), model, sp)
    for a, b in zip(g_long, g_full):
        assert torch.allclose(a, b, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- behaviour
def test_batch_of_different_sizes_converges_per_structure_and_freezes(sw_calc):
    structures = _mixed_batch()
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    model = StillingerWeber().double()
    cfg = RelaxConfig(fmax=0.01)
    res = relax(model, batch, cfg, record_trace=True)
    assert res.converged.all() and not res.blew_up.any()
    assert len(set(res.n_steps.tolist())) == 3  # each structure stopped on its own
    assert (res.fmax < 0.01).all()
    trace = res.energy_trace
    assert trace.shape == (int(res.n_steps.max()) + 1, 3)
    for k, n in enumerate(res.n_steps.tolist()):
        assert torch.all(trace[n:, k] == trace[n, k])  # frozen after convergence
        assert trace[n, k] == res.energy[k]
    # the same as each structure alone, and as ASE FIRE (exactly: same algorithm, same float64 forces)
    for k, atoms in enumerate(structures):
        alone = relax(model, batch.select([k]), cfg)
        sl = batch.system_slices()[k]
        assert torch.allclose(alone.batch.positions, res.batch.positions[sl], atol=1e-12)
        atoms = atoms.copy()
        atoms.calc = sw_calc()
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=0.01)
        assert opt.nsteps == res.n_steps[k].item()
        np.testing.assert_allclose(atoms.positions, res.batch.positions[sl].numpy(), atol=1e-9)


def test_graph_modes_freeze_converged_structures_too():
    batch = Batch.from_atoms(_mixed_batch()[:2], dtype=torch.float64)
    model = StillingerWeber().double()
    cfg = RelaxConfig(fmax=0.02)
    inference = relax(model, batch, cfg)
    full = relax(model, batch, cfg, grad_mode="full", record_trace=True)
    assert torch.equal(inference.n_steps, full.n_steps) and inference.n_steps[0] != inference.n_steps[1]
    assert torch.allclose(inference.batch.positions, full.batch.positions.detach(), atol=1e-12)
    assert torch.allclose(inference.forces, full.forces.detach(), atol=1e-12)
    k = int(torch.argmin(full.n_steps))
    assert torch.all(full.energy_trace[full.n_steps[k]:, k] == full.energy[k].detach())


def test_fixed_atoms_never_move(sw_calc):
    atoms = _si8(rattle=0.1)
    atoms.set_constraint(FixAtoms([0, 3, 5]))
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    model = StillingerWeber().double()
    for cfg in (RelaxConfig(fmax=0.01), RelaxConfig(optimizer="gd", fmax=0.01, max_steps=300)):
        res = relax(model, batch, cfg)
        assert res.converged.all()
        assert torch.equal(res.batch.positions[[0, 3, 5]], batch.positions[[0, 3, 5]])
        assert not torch.equal(res.batch.positions[1], batch.positions[1])
        free = torch.ones(8, dtype=torch.bool)
        free[[0, 3, 5]] = False
        assert res.forces[free].norm(dim=-1).max() < 0.01
        assert res.fmax[0] < 0.01 <= res.forces.norm(dim=-1).max()  # fmax is over free atoms only
    ref = atoms.copy()
    ref.calc = sw_calc()
    opt = FIRE(ref, logfile=None)
    opt.run(fmax=0.01)
    res = relax(model, batch, RelaxConfig(fmax=0.01))
    np.testing.assert_allclose(ref.positions, res.batch.positions.numpy(), atol=1e-9)


def test_gd_is_exactly_x_plus_eta_f():
    batch = Batch.from_atoms([_si8()], dtype=torch.float64)
    model = StillingerWeber().double()
    res = relax(model, batch, RelaxConfig(optimizer="gd", step_size=0.01, max_displacement=None, fmax=1e-9,
                                          max_steps=5))
    from relaxtune.potentials.base import energy_and_forces

    x = batch.positions
    prep = model.prepare(batch)
    for _ in range(5):
        x = x + 0.01 * energy_and_forces(model, batch.replace(positions=x), prep).forces
    assert torch.allclose(res.batch.positions, x, atol=1e-13)
    assert res.n_steps.item() == 5 and not res.converged.item()


def test_gd_relaxes_to_the_same_minimum_as_fire():
    batch = Batch.from_atoms(_mixed_batch()[:2], dtype=torch.float64)
    model = StillingerWeber().double()
    fire = relax(model, batch, RelaxConfig(fmax=1e-3))
    gd = relax(model, batch, RelaxConfig(optimizer="gd", fmax=1e-3, max_steps=2000, step_size=0.05))
    assert fire.converged.all() and gd.converged.all()
    assert torch.allclose(fire.energy, gd.energy, atol=1e-6)


@pytest.mark.parametrize("relax_cell", [False, True])
def test_lbfgs_relaxes_to_fires_minimum_in_fewer_steps(relax_cell):
    """Batched L-BFGS: structures of different sizes, fixed atoms and (with the cell) strain rows each converge
    with their own history to FIRE's minimum, in fewer steps; it refuses to build a graph."""
    structures = _mixed_batch()
    structures[0].set_constraint(FixAtoms([0, 1]))
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    model = StillingerWeber().double()
    fire = relax(model, batch, RelaxConfig(fmax=1e-4, max_steps=3000, relax_cell=relax_cell))
    lbfgs = relax(model, batch, RelaxConfig(optimizer="lbfgs", fmax=1e-4, max_steps=3000, relax_cell=relax_cell))
    assert bool(fire.converged.all()) and bool(lbfgs.converged.all())
    torch.testing.assert_close(lbfgs.energy, fire.energy, rtol=0, atol=1e-7)
    assert float((lbfgs.batch.positions - fire.batch.positions).abs().max()) < 1e-3
    if not relax_cell:  # (with the cell, fixed atoms follow its deformation)
        assert bool((lbfgs.batch.positions[:2] == batch.positions[:2]).all())  # fixed atoms stayed
    assert int(lbfgs.n_steps.sum()) < int(fire.n_steps.sum())
    with pytest.raises(ValueError, match="lbfgs"):
        relax(model, batch, RelaxConfig(optimizer="lbfgs"), grad_mode="full")


def test_blow_up_is_flagged_not_raised():
    """Two LJ atoms 0.3 sigma apart: |F| > 1e3 eV/Å, stopped and flagged; the other structure converges."""
    from ase import Atoms

    ok = bulk("Ar", "fcc", a=5.26, cubic=True)
    ok.rattle(0.05, seed=1)
    bad = Atoms("Ar2", positions=[[0, 0, 0], [1.0, 0, 0]], cell=[8, 8, 8], pbc=True)
    batch = Batch.from_atoms([ok, bad], dtype=torch.float64)
    model = LennardJones(sigma=3.4, epsilon=0.0104, rc=8.0).double()
    for mode in ("none", "full"):
        res = relax(model, batch, RelaxConfig(fmax=1e-3), grad_mode=mode)
        assert res.blew_up.tolist() == [False, True]
        assert res.converged.tolist() == [True, False]
        assert res.n_steps[1] == 0 and res.n_steps[0] > 0
        assert torch.isfinite(res.batch.positions).all()

    class NaNAfter(LennardJones):
        """Returns NaN energies once any atom left its start by more than 0.05 Å: a model breaking mid-run."""

        def energy(self, b, prepared):
            e = super().energy(b, prepared)
            moved = (b.positions - start).norm(dim=-1).max() > 0.05
            return torch.where(moved, torch.full_like(e, float("nan")), e)

    ok2 = ok.copy()
    ok2.rattle(0.2, seed=5)
    start = torch.tensor(ok2.positions)
    res = relax(NaNAfter(sigma=3.4, epsilon=0.0104, rc=8.0).double(), Batch.from_atoms([ok2], dtype=torch.float64),
                RelaxConfig(fmax=1e-3))
    assert res.blew_up.tolist() == [True] and 0 < res.n_steps.item() < 50


def test_non_finite_input_is_rejected():
    atoms = _si8()
    atoms.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match="structure 1"):
        relax(StillingerWeber().double(), Batch.from_atoms([_si8(), atoms], dtype=torch.float64))


def test_max_steps_and_progress_callback():
    batch = Batch.from_atoms(_mixed_batch()[:2], dtype=torch.float64)
    calls = []
    res = relax(StillingerWeber().double(), batch, RelaxConfig(fmax=1e-6, max_steps=7),
                progress=lambda step, done, total: calls.append((step, done, total)))
    assert res.n_steps.tolist() == [7, 7] and not res.converged.any()
    assert calls[-1] == (7, 2, 2) and len(calls) == 7
    zero = relax(StillingerWeber().double(), batch, RelaxConfig(max_steps=0))
    assert zero.n_steps.tolist() == [0, 0] and torch.equal(zero.batch.positions, batch.positions)


def test_neighbor_list_is_rebuilt_when_atoms_move_beyond_half_the_skin(sw_calc):
    """A tiny skin forces re-preparation mid-run; the result still equals ASE FIRE with exact forces."""
    atoms = _si8(rattle=0.15, seed=7)

    class Counting(StillingerWeber):
        prepares = 0

        def prepare(self, batch):
            type(self).prepares += 1
            return super().prepare(batch)

    model = Counting(skin=0.02).double()
    res = relax(model, Batch.from_atoms([atoms], dtype=torch.float64), RelaxConfig(fmax=0.005))
    assert Counting.prepares > 2
    ref = atoms.copy()
    ref.calc = sw_calc()
    FIRE(ref, logfile=None).run(fmax=0.005)
    np.testing.assert_allclose(ref.positions, res.batch.positions.numpy(), atol=1e-9)


def test_inference_under_no_grad_is_identical():
    """Callers (the implicit trainer, evaluation) run inference under torch.no_grad(): same result, cell too."""
    batch = Batch.from_atoms([_si8(a=5.3)], dtype=torch.float64)
    model = StillingerWeber().double()
    cfg = RelaxConfig(fmax=0.01, relax_cell=True)
    ref = relax(model, batch, cfg)
    with torch.no_grad():
        res = relax(model, batch, cfg)
    assert res.converged.all() and torch.equal(res.n_steps, ref.n_steps)
    assert torch.allclose(res.batch.cell, ref.batch.cell, atol=1e-12)
    assert not res.batch.positions.requires_grad and not res.energy.requires_grad
    assert all(p.requires_grad for p in model.parameters())  # restored after inference


def test_float32_inference():
    batch = Batch.from_atoms(_mixed_batch(), dtype=torch.float32)
    res = relax(StillingerWeber().float(), batch, RelaxConfig(fmax=0.02))
    assert res.converged.all() and res.batch.positions.dtype == torch.float32 and res.energy.dtype == torch.float32


def test_bad_arguments():
    batch = Batch.from_atoms([_si8()], dtype=torch.float64)
    model = StillingerWeber().double()
    with pytest.raises(ValueError):
        relax(model, batch, grad_mode="implicit")
    with pytest.raises(ValueError):
        relax(model, batch, grad_mode="truncated")
    with pytest.raises(ValueError):
        relax(model, batch, grad_mode="checkpoint")
    with pytest.raises(ValueError):
        RelaxConfig(optimizer="bfgs")


# ---------------------------------------------------------------------------------------------- CHGNet parity
@pytest.mark.slow
def test_fire_chgnet_matches_ase_fire_with_chgnet_calculator():
    """relaxtune FIRE + CHGNet (batched) vs ASE FIRE + CHGNetCalculator, 64-site Si defects rattled 0.05 Å."""
    from chgnet.model.dynamics import CHGNetCalculator

    from relaxtune.data.builders import rattle, si_defect
    from relaxtune.potentials.chgnet import CHGNetModel

    structures = [rattle(si_defect(kind), 0.05, seed) for kind, seed in (("vacancy", 1), ("int_T", 2))]
    model = CHGNetModel()
    res = relax(model, Batch.from_atoms(structures), RelaxConfig(fmax=0.05))
    assert res.converged.all()
    calc = CHGNetCalculator(model=model.model, use_device="cpu")
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)
        assert opt.run(fmax=0.05, steps=500)
        ours = res.batch.positions[res.batch.system_idx == k].double().numpy()
        assert np.linalg.norm(atoms.positions - ours, axis=1).max() <= 0.02
        assert abs(opt.nsteps - res.n_steps[k].item()) <= max(3, 0.15 * opt.nsteps)
        assert res.energy[k].item() == pytest.approx(atoms.get_potential_energy(), abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_chgnet_relaxation_from_a_large_rattle_lands_where_ase_does(seed):
    """From a 0.3 Å rattle (normal per component: atoms 0.48 Å from their sites on average, up to 1 Å) atoms
    cross CHGNet's cutoffs: the padded graph is rebuilt as they move, so the relaxation converges on CHGNet's
    true forces and lands at ASE FIRE + CHGNetCalculator's minimum. (At 0.5 Å per component every seed puts two
    atoms within 0.6-1.3 Å of each other, and ASE itself does not converge in 1000 steps.)"""
    stdev = 0.3
    from chgnet.model.dynamics import CHGNetCalculator

    from relaxtune.data.builders import rattle, si_defect
    from relaxtune.potentials.chgnet import CHGNetModel

    atoms = rattle(si_defect("vacancy"), stdev, seed)
    model = CHGNetModel()
    res = relax(model, Batch.from_atoms([atoms]), RelaxConfig(fmax=0.02, max_steps=1000))
    assert bool(res.converged.all())
    final = res.batch.replace(positions=res.batch.positions.detach())
    true = energy_and_forces(model, final, model.prepare(final))  # a graph built afresh at the end point
    assert float(torch.linalg.vector_norm(true.forces, dim=-1).max()) < 0.02
    reference = atoms.copy()
    reference.calc = CHGNetCalculator(model=model.model, use_device="cpu")
    assert FIRE(reference, logfile=None).run(fmax=0.02, steps=1000)
    ours = final.positions.double().numpy()
    assert np.linalg.norm(reference.positions - ours, axis=1).max() <= 0.02
    assert float(true.energy[0]) == pytest.approx(reference.get_potential_energy(), abs=1e-3)


@pytest.mark.slow
def test_a_structure_relaxes_the_same_alone_and_inside_a_batch():
    """Graph rebuilds follow each structure's own motion, and the padded graph is exact, so batch-mates (which
    converge and leave the batch at other times) do not change where a structure lands."""
    from relaxtune.data.builders import rattle, si_defect
    from relaxtune.potentials.chgnet import CHGNetModel

    model = CHGNetModel()
    target = rattle(si_defect("vacancy"), 0.15, 1)
    mates = [rattle(si_defect(kind), 0.15, 2) for kind in ("int_T", "sub_B", "int_split110")]
    config = RelaxConfig(fmax=0.02, max_steps=1000)
    alone = relax(model, Batch.from_atoms([target]), config)
    together = relax(model, Batch.from_atoms([mates[0], target] + mates[1:]), config)
    assert bool(alone.converged.all()) and bool(together.converged.all())
    mine = together.batch.positions[together.batch.system_idx == 1]
    assert float(torch.linalg.vector_norm(mine - alone.batch.positions, dim=-1).max()) <= 1e-3
