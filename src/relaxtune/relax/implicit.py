"""Implicit differentiation through a converged relaxation, and the training entry point for all grad modes.

At a relaxed structure X* the forces vanish, F_θ(X*) = 0. Differentiating that identity in the model
parameters θ gives ``H dX*/dθ = ∂F/∂θ`` with H = ∂²E/∂X² = -∂F/∂X (the Hessian), so for a loss L(X*)

    dL/dθ = gᵀ dX*/dθ = vᵀ ∂F/∂θ,    where  H v = g,  g = ∂L/∂X*.

``ImplicitFixedPoint`` is a custom autograd Function: its forward returns X* (found by a relaxation without a
graph), its backward solves H v = g by conjugate gradient (CG) on Hessian-vector products (one backward through
the force graph at X* each, i.e. a double backward of the model) and returns vᵀ ∂F/∂θ to the parameters. The
memory does not grow with the number of relaxation steps: one force graph at X* is kept during the solve. Each
structure's CG stops on its own; on a CPU each structure has its own force graph, so a Hessian-vector product
costs only the structures still iterating (``ImplicitConfig.separate_graphs``).

Null space and conditioning. H is singular: a rigid translation of a structure without fixed atoms changes no
energy (periodic or not), so H has three zero modes; an isolated molecule adds three rotations, and soft modes
make H ill-conditioned. We (1) project the uniform (mean) translation out of g and out of every CG direction
for structures with no fixed atoms, and (2) solve the damped system (H + λI) v = g with a small λ
(``ImplicitConfig.damping``, eV/Å², default 1e-3, small against the ~1-30 eV/Å² curvature of bonded solids).
Both are harmless for the θ-gradient: ∂F/∂θ is orthogonal to the translations (Σ_j F_j = 0 for every θ) and
to rotations (zero torque), so the components of v along null modes contribute nothing. The translation part
of g is the exact derivative of X* with respect to a rigid shift of the starting point, and is passed back to
the unrolled head in ``hybrid`` mode. Fixed atoms are removed from the system (their rows of g, v and Hv are 0).

Where CG meets a direction of non-positive curvature (the relaxation stopped near a saddle or a flat region,
or float32 round-off in a soft mode) that structure's CG stops and keeps its current iterate, as truncated
Newton-CG (Steihaug) does: the solution restricted to the Krylov space explored so far (counted in
``ImplicitStats.truncated``). Structures that blew up get no fixed-point gradient. In ``hybrid`` mode,
structures whose tail relaxation did not converge (or blew up) take the unrolled head's gradient instead,
treating the tail as a constant shift (the "truncated" approximation).

The parameters η of the relaxation (``StepParameters``) do not move a fixed point, so ``implicit`` gives them
zero gradient; ``hybrid`` reaches them only through the head of fallback structures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.autograd.function import once_differentiable

from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.relax.loop import relax
from relaxtune.state import Batch, per_system_sum

GRAD_MODES = ("none", "full", "truncated", "checkpoint", "implicit", "hybrid")


@dataclass(frozen=True)
class ImplicitConfig:
    """Settings of the implicit backward.

    cg_tol: stop when ||H v - g|| <= cg_tol * ||g|| per structure.  cg_max_iter: CG iteration cap.
    damping: λ of (H + λI) v = g, eV/Å².  project_translations: remove the rigid-translation component.
    per_structure: one force graph per structure (see ``separate_graphs``).
    """

    cg_tol: float = 1e-4
    cg_max_iter: int = 200
    damping: float = 1e-3
    project_translations: bool = True
    per_structure: bool | None = None

    def separate_graphs(self, device: torch.device) -> bool:
        """One force graph per structure (``per_structure``; None: on a CPU), so that a Hessian-vector product
        costs only the structures whose CG is still running; one batched graph makes every iteration cost the
        whole batch until its slowest structure converges (on a GPU a batched call costs about one call)."""
        return device.type == "cpu" if self.per_structure is None else bool(self.per_structure)


@dataclass
class ImplicitStats:
    """Filled in by the backward: what the last CG solve did (per structure where it applies)."""

    cg_iterations: int = 0  # of the slowest structure, summed over solves
    cg_structure_iterations: int = 0  # Hessian-vector products of single structures, summed over solves
    cg_converged: list[bool] = field(default_factory=list)
    negative_curvature: list[bool] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    solution: torch.Tensor | None = None  # v = (H+λ)⁻¹ P g (n_atoms, 3), zero where no solve ran
    truncated: int = 0  # structures whose CG stopped at a direction of negative curvature
    fallback: int = 0  # hybrid mode: structures whose gradient went through the unrolled head instead


def _per_atom(values: torch.Tensor, system_idx: torch.Tensor) -> torch.Tensor:
    return values[system_idx].unsqueeze(-1)


def _sys_dot(a: torch.Tensor, b: torch.Tensor, system_idx: torch.Tensor, n_sys: int) -> torch.Tensor:
    return per_system_sum((a * b).sum(-1), system_idx, n_sys)


def _translation_projector(batch: Batch, enabled: bool):
    """u -> u minus its per-structure mean, for structures without fixed atoms (others untouched)."""
    n_sys = batch.n_systems
    has_fixed = per_system_sum(batch.fixed.to(batch.dtype), batch.system_idx, n_sys) > 0
    project = (~has_fixed) & enabled
    counts = batch.n_atoms_per_system.to(batch.dtype)
    free = (~batch.fixed).to(batch.dtype).unsqueeze(-1)

    def apply(u: torch.Tensor) -> torch.Tensor:
        mean = per_system_sum(u, batch.system_idx, n_sys) / counts[:, None]
        mean = mean * project.to(u.dtype)[:, None]
        return (u - mean[batch.system_idx]) * free

    def null_part(u: torch.Tensor) -> torch.Tensor:
        mean = per_system_sum(u, batch.system_idx, n_sys) / counts[:, None]
        return (mean * project.to(u.dtype)[:, None])[batch.system_idx]

    return apply, null_part


def conjugate_gradient(
    matvec, b: torch.Tensor, system_idx: torch.Tensor, n_sys: int, tol: float, max_iter: int,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Solve A x = b for a block-diagonal SPD ``matvec`` (one block per structure), all blocks at once.

    ``matvec(u, active)``: A u on the blocks where ``active`` (n_sys,) is True; the other blocks of its result
    are not used, so it may skip them. Each structure has its own step sizes and stops on its own
    (||r|| <= tol ||b||); a non-positive curvature pᵀAp <= 0 makes it stop there, keeping its current iterate
    (truncated CG). ``x0``: a guess (e.g. the previous solve's solution for a nearby system), rescaled per
    structure to minimise the A-norm error along it (one extra matvec); a structure whose guess has no positive
    curvature or does not lower the residual starts from zero. Returns x and a dict: iterations (of the
    slowest structure), per_structure (n_sys,) the matvecs each structure took part in, converged (n_sys,),
    negative (n_sys,), residual.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = _sys_dot(b, b, system_idx, n_sys).sqrt()
    per_structure = torch.zeros(n_sys, dtype=torch.long, device=b.device)
    if x0 is not None:
        x0 = x0.to(b)
        guessed = _sys_dot(x0, x0, system_idx, n_sys) > 0
        ax0 = torch.where(_per_atom(guessed, system_idx), matvec(x0, guessed), torch.zeros_like(x0))
        per_structure += guessed.long()
        curvature = _sys_dot(x0, ax0, system_idx, n_sys)
        scale = torch.where(curvature > 0, _sys_dot(x0, b, system_idx, n_sys) / curvature.clamp_min(1e-300),
                            torch.zeros_like(curvature))
        r0 = b - _per_atom(scale, system_idx) * ax0
        better = _sys_dot(r0, r0, system_idx, n_sys).sqrt() < b_norm
        scale = torch.where(better, scale, torch.zeros_like(scale))
        x = _per_atom(scale, system_idx) * x0
        r = torch.where(_per_atom(better, system_idx), r0, b)
    p = r.clone()
    rs = _sys_dot(r, r, system_idx, n_sys)
    active = rs.sqrt() > tol * b_norm
    converged = ~active
    negative = torch.zeros_like(active)
    it = 0
    for it in range(1, max_iter + 1):
        if not bool(active.any()):
            it -= 1
            break
        ap = torch.where(_per_atom(active, system_idx), matvec(p, active), torch.zeros_like(p))
        per_structure += active.long()
        pap = _sys_dot(p, ap, system_idx, n_sys)
        bad = active & ~(pap > 0)
        negative = negative | bad
        active = active & ~bad
        alpha = torch.where(active, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(rs))
        x = x + _per_atom(alpha, system_idx) * p
        r = r - _per_atom(alpha, system_idx) * ap
        rs_new = _sys_dot(r, r, system_idx, n_sys)
        done = active & (rs_new.sqrt() <= tol * b_norm)
        converged = converged | done
        active = active & ~done
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = torch.where(_per_atom(active, system_idx), r + _per_atom(beta, system_idx) * p, p)
        rs = torch.where(active | done, rs_new, rs)
    residual = torch.where(b_norm > 0, rs.sqrt() / b_norm.clamp_min(1e-300), torch.zeros_like(rs))
    return x, {"iterations": it, "per_structure": per_structure, "converged": converged, "negative": negative,
               "residual": residual}


def implicit_vjp(
    model: EnergyModel,
    batch_star: Batch,
    g: torch.Tensor,
    params: Sequence[torch.Tensor],
    config: ImplicitConfig = ImplicitConfig(),
    guess: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor, dict]:
    """The implicit vector-Jacobian product at a relaxed structure.

    Returns (dL/dθ for each of ``params`` (None where unused), v = (H+λ)⁻¹ P g, CG info). ``batch_star`` is the
    relaxed batch (detached); ``g`` = ∂L/∂X* (n_atoms, 3); ``guess``: a starting point for v (CG's ``x0``).
    """
    project, _ = _translation_projector(batch_star, config.project_translations)
    with torch.enable_grad():
        graphs = _force_graphs(model, batch_star, config.separate_graphs(batch_star.device))

        def hvp(u: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            # H u = -∂(F·u)/∂X, only on the graphs that hold an active structure
            hu = torch.zeros_like(u)
            for graph in graphs:
                if bool(active[graph.systems].any()):
                    (hu[graph.rows],) = torch.autograd.grad(graph.forces, graph.positions,
                                                            grad_outputs=-u[graph.rows], retain_graph=True)
            return project(hu + config.damping * u)

        rhs = project(g.to(graphs[0].forces.dtype))
        v, info = conjugate_gradient(
            hvp, rhs, batch_star.system_idx, batch_star.n_systems, config.cg_tol, config.cg_max_iter,
            x0=project(guess.to(rhs)) if guess is not None else None,
        )
        grads: list[torch.Tensor | None] = [None] * len(params)
        if len(params) > 0:
            grads = list(torch.autograd.grad([graph.forces for graph in graphs], list(params),
                                             grad_outputs=[v[graph.rows] for graph in graphs], allow_unused=True))
    return grads, v, info


@dataclass(frozen=True)
class _ForceGraph:
    """Forces with their graph (create_graph) on a slice of a batch: ``rows`` its atoms, ``systems`` its
    structures."""

    positions: torch.Tensor
    forces: torch.Tensor
    rows: slice
    systems: slice


def _force_graphs(model: EnergyModel, batch: Batch, separate: bool) -> list[_ForceGraph]:
    """The force graph of ``batch`` at its positions: one for the whole batch, or one per structure."""
    if not separate:
        parts = [(batch, slice(0, batch.n_atoms), slice(0, batch.n_systems))]
    else:
        parts = [(batch.select([k]), rows, slice(k, k + 1)) for k, rows in enumerate(batch.system_slices())]
    graphs = []
    for part, rows, systems in parts:
        with torch.no_grad():
            topology = model.prepare(part)
        x = part.positions.detach().requires_grad_(True)
        ef = energy_and_forces(model, part.replace(positions=x), topology, create_graph=True)
        graphs.append(_ForceGraph(x, ef.forces, rows, systems))
    return graphs


class ImplicitFixedPoint(torch.autograd.Function):
    """Identity on X* in the forward; the implicit gradient in the backward (see the module docstring).

    apply(x_star, x_head, spec, *params): ``x_star`` detached relaxed positions, ``x_head`` the positions where
    the graph-carrying part ended (hybrid) or None, ``spec`` a dict with model, batch_star, config, fallback
    (n_sys bool: send g to the head instead), stats (ImplicitStats to fill), mode ("implicit"|"hybrid").
    """

    @staticmethod
    def forward(ctx, x_star, x_head, spec, *params):  # noqa: D401
        ctx.spec = spec
        ctx.has_head = x_head is not None
        ctx.n_params = len(params)
        return x_star.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        spec = ctx.spec
        batch_star: Batch = spec["batch_star"]
        model: EnergyModel = spec["model"]
        cfg: ImplicitConfig = spec["config"]
        stats: ImplicitStats = spec["stats"]
        params = spec["params"]
        fallback = spec["fallback"].clone()
        sys_idx = batch_star.system_idx
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        # Solve only where a fixed-point gradient is wanted and the loss actually depends on X*.
        g_norm = per_system_sum((g * g).sum(-1), sys_idx, batch_star.n_systems)
        solve = (~fallback) & (g_norm > 0)
        param_grads: list[torch.Tensor | None] = [None] * ctx.n_params
        if bool(solve.any()) and ctx.n_params > 0:
            idx = torch.nonzero(solve).flatten()
            atom_mask = solve[sys_idx]
            guess = spec.get("guess")
            param_grads, v, info = implicit_vjp(model, batch_star.select(idx), g[atom_mask], params, cfg,
                                                guess=guess[atom_mask] if guess is not None else None)
            stats.solution = torch.zeros_like(g).index_put((atom_mask,), v.detach())
            stats.cg_iterations += int(info["iterations"]) + (guess is not None)
            stats.cg_structure_iterations += int(info["per_structure"].sum())
            stats.cg_converged = info["converged"].tolist()
            stats.negative_curvature = info["negative"].tolist()
            stats.truncated += int(info["negative"].sum())
            stats.residual = info["residual"].tolist()
        head_grad = None
        if ctx.has_head:
            _, null_part = _translation_projector(batch_star, cfg.project_translations)
            stats.fallback += int(fallback.sum())
            head_grad = torch.where(fallback[sys_idx].unsqueeze(-1), g, null_part(g))
        return (None, head_grad, None, *param_grads)


def trainable_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def implicit_positions(
    model: EnergyModel,
    batch_star: Batch,
    *,
    x_head: torch.Tensor | None = None,
    fallback: torch.Tensor | None = None,
    config: ImplicitConfig = ImplicitConfig(),
    stats: ImplicitStats | None = None,
    guess: torch.Tensor | None = None,
) -> torch.Tensor:
    """X* as a tensor whose backward is the implicit gradient into ``model``'s trainable parameters (and, with
    ``x_head``, into the graph that produced the head positions). ``guess`` (n_atoms, 3): a starting point for
    the CG solve, e.g. the solution of the previous solve of the same structures (``stats.solution``)."""
    params = trainable_parameters(model)
    if fallback is None:
        fallback = torch.zeros(batch_star.n_systems, dtype=torch.bool, device=batch_star.device)
    spec = {
        "model": model,
        "batch_star": batch_star.replace(positions=batch_star.positions.detach()),
        "config": config,
        "fallback": fallback.to(batch_star.device),
        "stats": stats if stats is not None else ImplicitStats(),
        "params": params,
        "guess": guess.detach() if guess is not None else None,
    }
    return ImplicitFixedPoint.apply(batch_star.positions.detach(), x_head, spec, *params)


@dataclass
class TrainingRelaxation:
    """What ``relax_for_training`` returns: the relax engine's ``RelaxResult`` whose ``batch.positions`` carry
    the gradient of the chosen mode, and the implicit solver's stats (None for unrolled modes)."""

    result: Any
    stats: ImplicitStats | None = None

    @property
    def positions(self) -> torch.Tensor:
        return self.result.batch.positions


def relax_for_training(
    model: EnergyModel,
    batch: Batch,
    config,
    *,
    grad_mode: str = "full",
    step_params: torch.nn.Module | None = None,
    truncate_steps: int | None = None,
    checkpoint_every: int | None = None,
    hybrid_steps: int = 10,
    head_mode: str = "full",
    fallback_unconverged: bool = True,
    implicit: ImplicitConfig = ImplicitConfig(),
    prepared: Any = None,
    progress=None,
    cg_guess: torch.Tensor | None = None,
) -> TrainingRelaxation:
    """Relax ``batch`` with ``model`` keeping the gradient that ``grad_mode`` asks for.

    full | truncated | checkpoint go to ``relaxtune.relax.relax`` unchanged. ``implicit`` relaxes without a graph
    (``config.max_steps`` steps at most) and attaches the fixed-point backward. ``hybrid`` unrolls the first
    ``hybrid_steps`` steps with a graph (the head, where the basin is decided; ``head_mode`` full or
    checkpoint), continues without a graph to convergence (the tail, restarting the optimizer's internal state
    such as FIRE velocities), and attaches the fixed-point backward at the end point; structures whose tail
    did not converge (or blew up) take the head's unrolled gradient instead (the tail treated as a constant
    shift).
    ``fallback_unconverged=False`` uses the fixed-point gradient at the end point even where the tail did not
    converge (benchmarks that run exactly k steps). ``cg_guess``: a starting point for the implicit CG solve.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode: {grad_mode!r} is not one of {', '.join(GRAD_MODES)}")
    if grad_mode in ("none", "full", "truncated", "checkpoint"):
        result = relax(model, batch, config, step_params=step_params, grad_mode=grad_mode,
                       truncate_steps=truncate_steps, checkpoint_every=checkpoint_every, prepared=prepared,
                       progress=progress)
        return TrainingRelaxation(result=result)
    if getattr(config, "relax_cell", False):
        raise ValueError(f"grad_mode {grad_mode!r}: cell relaxation is not supported by the implicit backward; "
                         "use full, truncated or checkpoint")
    stats = ImplicitStats()
    if grad_mode == "implicit":
        with torch.no_grad():
            result = relax(model, batch, config, step_params=step_params, grad_mode="none", prepared=prepared,
                           progress=progress)
        star = result.batch.replace(positions=result.batch.positions.detach())
        fallback = _blown(result, star)
        x = implicit_positions(model, star, fallback=fallback, config=implicit, stats=stats, guess=cg_guess)
        return TrainingRelaxation(result=dataclasses.replace(result, batch=star.replace(positions=x)), stats=stats)
    # hybrid
    head_steps = max(1, min(int(hybrid_steps), int(config.max_steps)))
    head_cfg = dataclasses.replace(config, max_steps=head_steps)
    if head_mode not in ("full", "checkpoint"):
        raise ValueError(f"head_mode: {head_mode!r} is not full or checkpoint")
    head = relax(model, batch, head_cfg, step_params=step_params, grad_mode=head_mode,
                 checkpoint_every=(checkpoint_every or 1) if head_mode == "checkpoint" else None, prepared=prepared,
                 progress=progress)
    x_head = head.batch.positions
    tail_steps = int(config.max_steps) - head_steps
    start = head.batch.replace(positions=x_head.detach())
    if tail_steps > 0:
        with torch.no_grad():
            tail = relax(model, start, dataclasses.replace(config, max_steps=tail_steps), step_params=step_params,
                         grad_mode="none", progress=progress)
        n_steps = head.n_steps + tail.n_steps
    else:
        tail, n_steps = head, head.n_steps
    star = tail.batch.replace(positions=tail.batch.positions.detach())
    fallback = _blown(tail, star)
    if fallback_unconverged:
        fallback = fallback | ~tail.converged.to(torch.bool)
    x = implicit_positions(model, star, x_head=x_head, fallback=fallback, config=implicit, stats=stats,
                           guess=cg_guess)
    result = dataclasses.replace(tail, batch=star.replace(positions=x), n_steps=n_steps)
    return TrainingRelaxation(result=result, stats=stats)


def _blown(result, batch: Batch) -> torch.Tensor:
    """Structures that blew up (flag from the engine, or non-finite positions)."""
    blew = getattr(result, "blew_up", None)
    blew = torch.zeros(batch.n_systems, dtype=torch.bool) if blew is None else blew.to(torch.bool).cpu()
    bad_atoms = ~torch.isfinite(batch.positions.detach()).all(-1)
    bad = per_system_sum(bad_atoms.to(torch.float64), batch.system_idx, batch.n_systems) > 0
    return (blew | bad.cpu()).to(batch.device)
