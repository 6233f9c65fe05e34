"""Pure optimizer steps: GD exactly X + eta F, the smooth cap, FIRE == ASE FIRE step by step, gradients."""

import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.optimize import FIRE
from matscipy.calculators.manybody import Manybody
from matscipy.calculators.manybody import StillingerWeber as MatscipySW
from matscipy.calculators.manybody.explicit_forms.stillinger_weber import Stillinger_Weber_PRB_31_5262_Si

from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.relax.steps import (FireParams, LBFGSParams, fire_init, fire_step, gd_init, gd_step, lbfgs_init,
                                   lbfgs_step, merge_states, select_state, soft_cap)
from relaxtune.state import Batch, per_system_sum

# aggressive FIRE settings so that a few steps take every branch: the maxstep cap, dt growth, uphill restarts
WILD = FireParams(dt=0.3, maxstep=0.1, Nmin=1)


def _si_pair():
    a = bulk("Si", "diamond", a=5.40, cubic=True)
    a.rattle(0.1, seed=1)
    b = bulk("Si", "diamond", a=5.50)
    b.rattle(0.1, seed=2)
    return [a, b]


def test_gd_step_is_exactly_x_plus_eta_f_and_pure():
    x = torch.randn(5, 3, dtype=torch.float64)
    f = torch.randn(5, 3, dtype=torch.float64)
    rows = torch.tensor([0, 0, 1, 1, 1])
    state = gd_init(x, 2, torch.tensor([0.02, 0.05], dtype=torch.float64))
    x_before = x.clone()
    new = gd_step(state, f, rows, anneal=0.9)
    assert torch.equal(x, x_before)  # inputs untouched
    eta = torch.tensor([0.02, 0.02, 0.05, 0.05, 0.05], dtype=torch.float64)
    assert torch.equal(new.positions, x + eta[:, None] * f)
    assert torch.allclose(new.step_size, torch.tensor([0.018, 0.045], dtype=torch.float64))
    # heavy ball: v1 = eta F0, v2 = mu v1 + eta F1
    s2 = gd_step(gd_step(gd_init(x, 2, 0.1), f, rows, momentum=0.5), 2 * f, rows, momentum=0.5)
    assert torch.allclose(s2.positions, x + 0.1 * f + (0.5 * 0.1 * f + 0.1 * 2 * f))


def test_soft_cap_identity_below_half_cap_bounded_above_and_smooth():
    d = torch.tensor([[0.05, 0.0, 0.0], [0.0, 0.099, 0.0], [0.3, 0.4, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                     dtype=torch.float64)
    out = soft_cap(d, 0.2)
    assert torch.equal(out[:2], d[:2]) and torch.equal(out[4], d[4])
    lengths = out.norm(dim=-1)
    assert 0.1 < lengths[2] < 0.2 and 0.1999 < lengths[3] <= 0.2
    assert torch.allclose(out[2] / lengths[2], d[2] / d[2].norm())  # direction kept
    # continuous first and second derivative across the knee at cap/2, non-zero derivative when capped
    x = torch.tensor([[0.1 - 1e-7, 0.0, 0.0], [0.1 + 1e-7, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: soft_cap(v, 0.2), (torch.tensor([[0.07, 0.09, 0.02], [0.5, -0.3, 0.1]],
                             dtype=torch.float64, requires_grad=True),))
    g = torch.autograd.grad(soft_cap(x, 0.2)[:, 0].sum(), x)[0][:, 0]
    assert torch.allclose(g[0], g[1], atol=1e-6)
    big = torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.grad(soft_cap(big, 0.2).sum(), big)[0][0, 0] > 0.01


def _ase_trajectory(optimizer, atoms, steps: int, **kwargs) -> list[np.ndarray]:
    """Positions after every step of an ASE optimizer with matscipy's SW (the initial positions first)."""
    atoms = atoms.copy()
    atoms.calc = Manybody(**MatscipySW(Stillinger_Weber_PRB_31_5262_Si))
    opt = optimizer(atoms, logfile=None, **kwargs)
    traj = []  # the observer also sees the initial positions
    opt.attach(lambda: traj.append(atoms.positions.copy()))
    opt.run(fmax=1e-9, steps=steps)
    return traj


def _our_trajectory(step, state, batch: Batch, steps: int):
    """Positions after every ``step(state, forces, system_idx)`` driven by SW forces, and the last state."""
    model = StillingerWeber().double()
    prep = model.prepare(batch)
    ours = [state.positions.clone()]
    for _ in range(steps):
        f = energy_and_forces(model, batch.replace(positions=state.positions), prep).forces
        state = step(state, f, batch.system_idx)
        ours.append(state.positions.clone())
    return ours, state


def test_fire_steps_match_ase_fire_trajectory_exactly():
    """fire_step driven by SW forces reproduces ase.optimize.FIRE position by position (float64)."""
    structures = _si_pair()
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    ours, state = _our_trajectory(lambda st, f, idx: fire_step(st, f, idx, WILD), fire_init(batch.positions, 2, WILD),
                                  batch, 25)
    assert (state.n_pos == 0).any() or (state.dt < WILD.dt).any()  # an uphill restart happened
    for k, atoms in enumerate(structures):
        traj = _ase_trajectory(FIRE, atoms, 25, dt=WILD.dt, maxstep=WILD.maxstep, Nmin=WILD.Nmin)
        sl = batch.system_slices()[k]
        assert len(traj) == 26
        for t in range(1, 26):
            np.testing.assert_allclose(ours[t][sl].numpy(), traj[t], atol=1e-10, err_msg=f"step {t}")


def test_lbfgs_steps_match_ase_lbfgs_trajectory_exactly():
    """lbfgs_step driven by SW forces reproduces ase.optimize.LBFGS position by position, each structure of the
    batch with its own history (float64); a small maxstep makes the step cap act."""
    from ase.optimize import LBFGS

    structures = _si_pair()
    structures[1] = structures[1] * (2, 1, 1)  # another size
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    params = LBFGSParams(maxstep=0.05)
    ours, _ = _our_trajectory(lambda st, f, idx: lbfgs_step(st, f, idx, params), lbfgs_init(batch.positions, 2, params),
                              batch, 20)
    for k, atoms in enumerate(structures):
        traj = _ase_trajectory(LBFGS, atoms, 20, maxstep=params.maxstep)
        sl = batch.system_slices()[k]
        assert len(traj) > 10  # ASE may converge to 1e-9 before 20 steps
        for t in range(1, len(traj)):
            np.testing.assert_allclose(ours[t][sl].numpy(), traj[t], atol=1e-8, err_msg=f"structure {k} step {t}")


def test_fire_per_structure_quantities():
    """Structures in one batch keep their own dt, alpha and N: a batch equals its structures run alone."""
    structures = _si_pair()
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    model = StillingerWeber().double()

    def run(b):
        prep = model.prepare(b)
        s = fire_init(b.positions, b.n_systems, WILD)
        for _ in range(12):
            s = fire_step(s, energy_and_forces(model, b.replace(positions=s.positions), prep).forces, b.system_idx, WILD)
        return s

    together = run(batch)
    assert together.dt[0] != together.dt[1]
    for k in range(2):
        alone = run(batch.select([k]))
        sl = batch.system_slices()[k]
        assert torch.allclose(together.positions[sl], alone.positions, atol=1e-12)
        assert together.dt[k] == alone.dt[0] and together.n_pos[k] == alone.n_pos[0]


def test_fire_gradcheck_through_all_branches():
    """d(final positions)/d(dt0, SW lambda, initial positions) through 10 FIRE steps taking every branch."""
    structures = _si_pair()[:1]
    batch = Batch.from_atoms(structures, dtype=torch.float64)
    model = StillingerWeber().double()
    prep = model.prepare(batch)
    proj = torch.randn(batch.n_atoms * 3, 4, dtype=torch.float64)
    del model.lambda1

    def fn(dt0, lam, x0):
        model.lambda1 = lam
        s = fire_init(x0, 1, WILD, dt=dt0)
        for _ in range(10):
            f = energy_and_forces(model, batch.replace(positions=s.positions), prep, create_graph=True).forces
            s = fire_step(s, f, batch.system_idx, WILD)
        return s.positions.reshape(-1) @ proj

    inputs = (torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
              torch.tensor(21.0, dtype=torch.float64, requires_grad=True),
              batch.positions.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gd_gradcheck_with_cap_anneal_momentum():
    x0 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1.0, 2.0, 5.0, 0.5, 3.0, 8.0], dtype=torch.float64)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])

    def fn(eta, mu, x):
        s = gd_init(x, 2, eta)
        for _ in range(6):
            s = gd_step(s, -k[:, None] * s.positions**3, rows, max_displacement=0.3, anneal=0.9, momentum=mu)
        return s.positions

    inputs = (torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.4, dtype=torch.float64, requires_grad=True), x0)
    assert torch.autograd.gradcheck(fn, inputs)


def test_merge_and_select_states():
    x = torch.zeros(5, 3, dtype=torch.float64)
    rows = torch.tensor([0, 0, 1, 1, 1])
    old = fire_init(x, 2)
    new = fire_step(old, torch.ones(5, 3, dtype=torch.float64), rows)
    merged = merge_states(torch.tensor([False, True]), new, old, rows)
    assert torch.equal(merged.positions[:2], old.positions[:2]) and torch.equal(merged.positions[2:], new.positions[2:])
    assert merged.started.tolist() == [False, True]
    sub = select_state(merged, torch.tensor([1]), torch.tensor([2, 3, 4]))
    assert sub.positions.shape == (3, 3) and sub.dt.shape == (1,)
    assert per_system_sum(torch.ones(5), rows, 2).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_keep_dtype(dtype):
    x = torch.randn(4, 3, dtype=dtype)
    rows = torch.tensor([0, 0, 1, 1])
    assert fire_step(fire_init(x, 2), torch.randn(4, 3, dtype=dtype), rows).positions.dtype == dtype
    assert gd_step(gd_init(x, 2, 0.02), torch.randn(4, 3, dtype=dtype), rows, max_displacement=0.2).positions.dtype == dtype
    assert math.isfinite(float(soft_cap(torch.zeros(1, 3, dtype=dtype), 0.2).sum()))


def test_scaled_lbfgs_adapts_to_the_stiffness_of_each_structure():
    """On E = Σ k_i/2 (x_i - x0_i)² with curvatures far from ASE's alpha (soft: 1-3 eV/Å², stiff: 200-600),
    h0="scaled" reaches the minimum of each structure of the batch in fewer steps than the fixed 1/alpha."""
    torch.manual_seed(0)
    x0 = torch.randn(8, 3, dtype=torch.float64)
    row_system = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scale = torch.tensor([1.0, 200.0], dtype=torch.float64)[row_system, None]
    k = scale * (1.0 + 2.0 * torch.rand(8, 3, dtype=torch.float64))
    start = x0 + 0.05 * torch.randn(8, 3, dtype=torch.float64)

    def steps_to_minimum(h0: str) -> list[int]:
        params = LBFGSParams(maxstep=0.2, h0=h0)
        state, taken = lbfgs_init(start, 2, params), [0, 0]
        for _ in range(200):
            forces = -k * (state.positions - x0)
            norms = forces.norm(dim=-1)
            done = [bool(norms[row_system == s].max() < 1e-8) for s in (0, 1)]
            if all(done):
                return taken
            state = lbfgs_step(state, forces, row_system, params)
            taken = [t + (not d) for t, d in zip(taken, done)]
        raise AssertionError(f"{h0}: no minimum in 200 steps")

    scaled, fixed = steps_to_minimum("scaled"), steps_to_minimum("fixed")
    assert all(s < f for s, f in zip(scaled, fixed)), (scaled, fixed)
