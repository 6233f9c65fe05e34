"""Implicit differentiation at a relaxed fixed point: CG, finite differences on Stillinger-Weber, agreement
with unrolled gradients."""

import dataclasses

import numpy as np
import pytest
import torch
from ase.build import bulk

from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.relax.implicit import (
    ImplicitConfig,
    ImplicitStats,
    conjugate_gradient,
    implicit_positions,
)
from relaxtune.state import Batch
from relaxtune.metrics import dq

TIGHT = ImplicitConfig(cg_tol=1e-12, cg_max_iter=500, damping=0.0)


def _si_defect(seed: int, vacancy: bool = True, rattle: float = 0.08):
    a = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 1, 1)
    if vacancy:
        del a[3]
    rng = np.random.default_rng(seed)
    a.positions += rng.normal(scale=rattle, size=a.positions.shape)
    return a


def _minimize(model, batch, fmax=1e-11, eta=0.03, max_steps=5000):
    """Reference minimizer independent of the relax engine (float64): gradient descent to 1e-3 eV/Å, then
    Newton steps with the dense Hessian (pseudo-inverse over the free atoms) to a very tight ``fmax``."""
    x = batch.positions.detach()
    free = (~batch.fixed).unsqueeze(-1).to(x.dtype)
    prepared = model.prepare(batch)

    def forces(pos, graph=False):
        return energy_and_forces(model, batch.replace(positions=pos), prepared, create_graph=graph).forces * free

    for _ in range(max_steps):
        f = forces(x)
        if f.norm(dim=-1).max() < 1e-3:
            break
        x = x + eta * f
    prepared = model.prepare(batch.replace(positions=x))
    for _ in range(20):
        f = forces(x)
        if f.norm(dim=-1).max() < fmax:
            return batch.replace(positions=x)
        hess = -torch.autograd.functional.jacobian(lambda p: forces(p, True), x).reshape(x.numel(), x.numel())
        dof = free.expand_as(x).reshape(-1).bool()
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[dof] = torch.linalg.pinv(hess[dof][:, dof], hermitian=True, rtol=1e-10) @ f.reshape(-1)[dof]
        x = x + step.reshape(-1, 3)
    raise AssertionError("reference minimizer did not converge")


def _spd_blocks(n_sys: int, n_at: int, shift: float) -> list[torch.Tensor]:
    """Random symmetric positive-definite (3 n_at)² blocks, one per structure (A Aᵀ + shift I)."""
    eye = torch.eye(3 * n_at, dtype=torch.float64)
    return [a @ a.T + shift * eye for a in (torch.randn(3 * n_at, 3 * n_at, dtype=torch.float64) for _ in range(n_sys))]


def test_conjugate_gradient_batched_blocks_and_negative_curvature():
    torch.manual_seed(1)
    n_sys, n_at = 3, 4
    sys_idx = torch.arange(n_sys).repeat_interleave(n_at)
    mats = _spd_blocks(n_sys, n_at, 0.5)
    mats[2] = mats[2] - 100.0 * torch.eye(3 * n_at, dtype=torch.float64)  # indefinite block

    asked = torch.zeros(n_sys, dtype=torch.long)

    def matvec(u, active):
        asked.add_(active.long())
        blocks = u.reshape(n_sys, 3 * n_at)
        out = torch.stack([mats[k] @ blocks[k] if active[k] else torch.full_like(blocks[k], torch.nan)
                           for k in range(n_sys)])  # blocks not asked for are never used
        return out.reshape(-1, 3)

    b = torch.randn(n_sys * n_at, 3, dtype=torch.float64)
    x, info = conjugate_gradient(matvec, b, sys_idx, n_sys, tol=1e-12, max_iter=200)
    for k in range(2):
        expect = torch.linalg.solve(mats[k], b.reshape(n_sys, -1)[k])
        torch.testing.assert_close(x.reshape(n_sys, -1)[k], expect, rtol=1e-8, atol=1e-10)
    assert info["converged"].tolist() == [True, True, False]
    assert info["negative"].tolist() == [False, False, True]
    # each structure is asked only while its own CG runs: the indefinite block stops at its first direction
    assert info["per_structure"].tolist() == asked.tolist()
    assert asked[2] == 1 and asked.max() == info["iterations"] and asked[:2].min() > 1


def test_conjugate_gradient_from_a_nearby_solution_reaches_the_same_answer_in_fewer_iterations():
    """The warm start of training: the previous solve's v for a slightly different system and right-hand side,
    at any scale or sign, is rescaled per structure; a zero guess is the cold solve."""
    torch.manual_seed(2)
    n_sys, n_at = 3, 10
    sys_idx = torch.arange(n_sys).repeat_interleave(n_at)
    mats = _spd_blocks(n_sys, n_at, 0.1)

    def matvec_of(ms):
        def matvec(u, active):
            blocks = u.reshape(n_sys, 3 * n_at)
            return torch.stack([ms[k] @ blocks[k] for k in range(n_sys)]).reshape(-1, 3)
        return matvec

    b = torch.randn(n_sys * n_at, 3, dtype=torch.float64)
    previous, _ = conjugate_gradient(matvec_of([m * 1.02 for m in mats]), b + 0.05 * torch.randn_like(b), sys_idx,
                                     n_sys, tol=1e-10, max_iter=500)
    guess = previous * torch.tensor([3.0, 0.5, -1.0], dtype=torch.float64)[sys_idx, None]  # any scale
    cold, info_cold = conjugate_gradient(matvec_of(mats), b, sys_idx, n_sys, tol=1e-4, max_iter=500)
    warm, info_warm = conjugate_gradient(matvec_of(mats), b, sys_idx, n_sys, tol=1e-4, max_iter=500, x0=guess)
    exact = torch.stack([torch.linalg.solve(mats[k], b.reshape(n_sys, -1)[k]) for k in range(n_sys)])
    for x in (cold, warm):
        assert float((x.reshape(n_sys, -1) - exact).norm() / exact.norm()) < 1e-2
    assert bool(info_warm["converged"].all())
    assert info_warm["iterations"] < info_cold["iterations"]
    partial = torch.where((sys_idx == 2)[:, None], torch.zeros_like(guess), guess)
    mixed, _ = conjugate_gradient(matvec_of(mats), b, sys_idx, n_sys, tol=1e-4, max_iter=500, x0=partial)
    torch.testing.assert_close(mixed[sys_idx == 2], cold[sys_idx == 2])  # zero guess: the cold solve


@pytest.mark.parametrize("per_structure", [True, False])
@pytest.mark.parametrize("fixed", [False, True])
def test_implicit_matches_finite_difference_of_converged_structure_sw(fixed, per_structure):
    """dDq(X*)/dθ by the implicit backward == central finite difference of re-relaxed structures (float64),
    with one force graph per structure and with one for the batch."""
    atoms = [_si_defect(0), _si_defect(1, vacancy=False)]
    batch0 = Batch.from_atoms(atoms, dtype=torch.float64)
    if fixed:
        mask = torch.zeros(batch0.n_atoms, dtype=torch.bool)
        mask[[0, 5, 20]] = True
        batch0 = batch0.replace(fixed=mask)
    reference = torch.tensor(np.concatenate([_si_defect(7).positions[:15], _si_defect(8, vacancy=False).positions]))
    model = StillingerWeber()
    star = _minimize(model, batch0)
    stats = ImplicitStats()
    config = dataclasses.replace(TIGHT, per_structure=per_structure)
    x = implicit_positions(model, star, config=config, stats=stats)
    loss = dq(star.replace(positions=x), reference).sum()
    loss.backward()
    assert all(stats.cg_converged) and not any(stats.negative_curvature)
    assert stats.cg_structure_iterations <= 2 * stats.cg_iterations
    for name in ("lambda1", "sigma"):
        p = getattr(model, name)
        h = 1e-5 * max(1.0, abs(float(p.detach())))
        vals = []
        for s in (1, -1):
            with torch.no_grad():
                p += s * h
            vals.append(dq(_minimize(model, batch0), reference).sum().item())
            with torch.no_grad():
                p -= s * h
        fd = (vals[0] - vals[1]) / (2 * h)
        assert p.grad is not None
        np.testing.assert_allclose(p.grad.item(), fd, rtol=2e-4, atol=1e-6)


def test_implicit_gradient_ignores_translation_component_of_loss_gradient():
    atoms = [_si_defect(2)]
    batch0 = Batch.from_atoms(atoms, dtype=torch.float64)
    model = StillingerWeber()
    star = _minimize(model, batch0, fmax=1e-9)
    g = torch.randn(star.n_atoms, 3, dtype=torch.float64)
    grads = []
    for extra in (0.0, 3.0):
        model.zero_grad()
        x = implicit_positions(model, star, config=ImplicitConfig(cg_tol=1e-12, cg_max_iter=500))
        (x * (g + extra)).sum().backward()
        grads.append(torch.stack([p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)
    assert grads[0].abs().max() > 0


def _grads(model, names=("sigma", "B", "lambda1")):
    return torch.stack([getattr(model, n).grad.clone() for n in names])


def _run(mode, cfg, batch, reference, **kw):
    from relaxtune.relax.implicit import relax_for_training

    model = StillingerWeber()
    out = relax_for_training(model, batch, cfg, grad_mode=mode, implicit=TIGHT, **kw)
    dq(out.result.batch, reference).sum().backward()
    return _grads(model), out


def _sw_problem():
    batch = Batch.from_atoms([_si_defect(0), _si_defect(1, vacancy=False)], dtype=torch.float64)
    reference = torch.tensor(np.concatenate([_si_defect(7).positions[:15], _si_defect(8, vacancy=False).positions]))
    return batch, reference


@pytest.mark.parametrize("optimizer", ["fire", "gd"])
def test_implicit_and_hybrid_agree_with_full_when_converged(optimizer):
    """With an unroll long enough to converge tightly, the unrolled (BPTT) gradient equals the fixed-point one.
    (GD without the displacement cap: the cap moves the centre of mass along the path, a translation the
    fixed point cannot see; FIRE's cap is uniform per structure.)"""
    from relaxtune.relax import RelaxConfig

    batch, reference = _sw_problem()
    cfg = RelaxConfig(optimizer=optimizer, fmax=1e-7, max_steps=3000, step_size=0.03, max_displacement=None)
    full, out_full = _run("full", cfg, batch, reference)
    assert bool(out_full.result.converged.all())
    implicit, out_imp = _run("implicit", cfg, batch, reference)
    hybrid, out_hyb = _run("hybrid", cfg, batch, reference, hybrid_steps=10)
    assert out_imp.stats.truncated == 0 and out_hyb.stats.fallback == 0
    # the unrolled gradient converges to the fixed-point one as fmax -> 0 (measured: 5e-3 relative at fmax
    # 1e-5, 2e-4 at 1e-7, 2e-6 at 1e-9 for gd)
    torch.testing.assert_close(implicit, full, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(hybrid, full, rtol=1e-3, atol=1e-6)


def test_checkpoint_equals_full():
    from relaxtune.relax import RelaxConfig

    batch, reference = _sw_problem()
    cfg = RelaxConfig(optimizer="gd", fmax=1e-4, max_steps=25)
    full, _ = _run("full", cfg, batch, reference)
    ckpt, _ = _run("checkpoint", cfg, batch, reference, checkpoint_every=6)
    torch.testing.assert_close(ckpt, full, rtol=1e-10, atol=1e-12)


def test_hybrid_falls_back_to_unrolled_head_when_tail_does_not_converge():
    """Tail cut short: the gradient goes through the head as if the tail were a constant shift."""
    from relaxtune.relax import RelaxConfig, relax

    batch, reference = _sw_problem()
    cfg = RelaxConfig(optimizer="fire", fmax=1e-7, max_steps=20)
    hybrid, out = _run("hybrid", cfg, batch, reference, hybrid_steps=8)
    assert out.stats.fallback == 2 and not bool(out.result.converged.any())
    model = StillingerWeber()
    head = relax(model, batch, RelaxConfig(optimizer="fire", fmax=1e-7, max_steps=8), grad_mode="full")
    end = out.result.batch.positions.detach()
    x = head.batch.positions + (end - head.batch.positions).detach()
    dq(head.batch.replace(positions=x), reference).sum().backward()
    torch.testing.assert_close(hybrid, _grads(model), rtol=1e-10, atol=1e-12)
    assert hybrid.abs().max() > 0
