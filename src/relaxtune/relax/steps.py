"""Pure optimizer steps over a batch of generalized coordinates.

The optimizers see only rows: ``positions`` (n_rows, 3), ``forces`` (n_rows, 3) and ``row_system`` (which
structure each row belongs to). For a fixed cell the rows are the atoms; with cell relaxation
(``relaxtune.relax.cell``) three rows per structure hold its log-deformation. Every ``*_step`` builds a new
frozen state and never mutates its inputs, so gradients flow through any number of steps.

* ``gd_init`` / ``gd_step``: gradient descent as in the reference method, ``X <- X + eta F``, optionally with
  heavy-ball momentum, step annealing (eta multiplied by ``anneal`` each step) and a smooth per-row
  displacement cap (see ``soft_cap``).
* ``lbfgs_init`` / ``lbfgs_step``: ASE's L-BFGS (``ase.optimize.LBFGS``: memory 100, initial inverse Hessian
  1/70 Å²/eV, the whole step scaled so that no row moves more than ``maxstep``), per structure, each with its
  own history; with ``h0="scaled"`` the initial inverse Hessian of each step is sᵀy / yᵀy of the structure's
  newest step instead (Nocedal & Wright's choice), which adapts to the material's stiffness. Quasi-Newton steps reach a minimum in fewer model calls than FIRE; they are for relaxations
  without a graph (inference, the forward of the implicit gradient), not for unrolled differentiation.
* ``fire_init`` / ``fire_step``: ASE's FIRE (``ase.optimize.FIRE``, default ``downhill_check=False``), per
  structure. Its branch decisions (is P = F.v > 0, has N exceeded Nmin, is the step longer than maxstep) are
  taken on detached values; the updates of velocities, time step and positions stay differentiable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from relaxtune.metrics import safe_sqrt
from relaxtune.state import per_system_sum

Scalar = float | torch.Tensor


def soft_cap(displacement: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Limit each row's length to ``cap`` smoothly.

    Rows shorter than cap/2 are untouched (so small steps are exactly ``eta F``); longer ones have their length
    mapped by ``r0 + (cap - r0) tanh((r - r0) / (cap - r0))`` with r0 = cap/2: continuous with two continuous
    derivatives at r0, below cap everywhere, and with a non-zero derivative, so gradients w.r.t. the step size
    survive in the capped regime (a hard clip would zero them).
    """
    if cap is None:
        return displacement
    r0 = 0.5 * cap
    r2 = (displacement * displacement).sum(-1)
    big = r2 > r0 * r0
    r = safe_sqrt(torch.where(big, r2, torch.full_like(r2, 4.0 * r0 * r0)))
    squashed = r0 + (cap - r0) * torch.tanh((r - r0) / (cap - r0))
    scale = torch.where(big, squashed / r, torch.ones_like(r2))
    return displacement * scale[:, None]


# ---------------------------------------------------------------------------------------------- gradient descent
@dataclass(frozen=True)
class GDState:
    positions: torch.Tensor  # (n_rows, 3)
    velocity: torch.Tensor  # (n_rows, 3) last displacement (heavy-ball buffer)
    step_size: torch.Tensor  # (n_systems,) current eta (annealed)

    ROW_FIELDS = ("positions", "velocity")


def gd_init(positions: torch.Tensor, n_systems: int, step_size: Scalar) -> GDState:
    """Gradient-descent state at ``positions`` with initial step size ``step_size`` (Å²/eV)."""
    eta = torch.as_tensor(step_size, dtype=positions.dtype, device=positions.device)
    return GDState(positions=positions, velocity=torch.zeros_like(positions),
                   step_size=eta.expand(n_systems) if eta.dim() == 0 else eta)


def gd_step(state: GDState, forces: torch.Tensor, row_system: torch.Tensor, *, row_scale: torch.Tensor | None = None,
            max_displacement: float | None = None, anneal: Scalar = 1.0, momentum: Scalar = 0.0) -> GDState:
    """One step ``v <- cap(mu v + eta F); X <- X + v; eta <- anneal eta``.

    ``row_scale`` (n_rows,) multiplies eta per row (per-element step scales); with ``momentum = 0`` and no cap
    this is exactly ``X + eta F``.
    """
    eta = state.step_size[row_system]
    if row_scale is not None:
        eta = eta * row_scale
    move = eta[:, None] * forces
    if not (isinstance(momentum, (int, float)) and momentum == 0):
        move = momentum * state.velocity + move
    move = soft_cap(move, max_displacement)
    return GDState(positions=state.positions + move, velocity=move, step_size=state.step_size * anneal)


# ---------------------------------------------------------------------------------------------- FIRE
@dataclass(frozen=True)
class FireParams:
    """ASE FIRE's parameters (same names and defaults as ``ase.optimize.FIRE``)."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


@dataclass(frozen=True)
class FireState:
    positions: torch.Tensor  # (n_rows, 3)
    velocity: torch.Tensor  # (n_rows, 3)
    dt: torch.Tensor  # (n_systems,)
    alpha: torch.Tensor  # (n_systems,)  ASE's ``a``
    n_pos: torch.Tensor  # (n_systems,) long, ASE's ``Nsteps``: steps since the last restart
    started: torch.Tensor  # (n_systems,) bool, False until the first step (ASE's ``vel is None``)

    ROW_FIELDS = ("positions", "velocity")


def fire_init(positions: torch.Tensor, n_systems: int, params: FireParams = FireParams(),
              dt: Scalar | None = None) -> FireState:
    """FIRE state at rest. ``dt`` (a tensor, possibly learnable) overrides ``params.dt``."""
    kw = dict(dtype=positions.dtype, device=positions.device)
    dt0 = torch.as_tensor(params.dt if dt is None else dt, **kw)
    return FireState(
        positions=positions, velocity=torch.zeros_like(positions),
        dt=dt0.expand(n_systems) if dt0.dim() == 0 else dt0,
        alpha=torch.full((n_systems,), params.astart, **kw),
        n_pos=torch.zeros(n_systems, dtype=torch.long, device=positions.device),
        started=torch.zeros(n_systems, dtype=torch.bool, device=positions.device),
    )


def fire_step(state: FireState, forces: torch.Tensor, row_system: torch.Tensor,
              params: FireParams = FireParams()) -> FireState:
    """One ASE FIRE step per structure (all sums and norms run over the rows of one structure).

    After the first step: P = F.v; if P > 0, mix ``v <- (1-a) v + a |v| F/|F|`` and, once more than Nmin
    such steps in a row were taken, ``dt <- min(finc dt, dtmax)``, ``a <- fa a``; otherwise ``v <- 0``,
    ``a <- astart``, ``dt <- fdec dt``. Then ``v <- v + dt F``, ``dr = dt v``, scaled down to length maxstep
    if the whole structure's |dr| exceeds it. Masses are not used (as in ASE).
    """
    n_sys = state.dt.shape[0]
    f, v = forces, state.velocity
    p_power = per_system_sum((f * v).sum(-1).detach(), row_system, n_sys)
    uphill = state.started & ~(p_power > 0.0)
    downhill = state.started & (p_power > 0.0)

    f_norm = safe_sqrt(per_system_sum((f * f).sum(-1), row_system, n_sys))
    v_norm = safe_sqrt(per_system_sum((v * v).sum(-1), row_system, n_sys))
    a = state.alpha
    ratio = torch.where(f_norm > 0, v_norm / torch.where(f_norm > 0, f_norm, torch.ones_like(f_norm)),
                        torch.zeros_like(f_norm))
    mixed = (1.0 - a[row_system, None]) * v + (a * ratio)[row_system, None] * f
    v = torch.where(downhill[row_system, None], mixed, v)
    v = torch.where(uphill[row_system, None], torch.zeros_like(v), v)

    grow = downhill & (state.n_pos > params.Nmin)
    dt = torch.where(grow, torch.minimum(state.dt * params.finc, torch.full_like(state.dt, params.dtmax)), state.dt)
    dt = torch.where(uphill, dt * params.fdec, dt)
    a = torch.where(grow, a * params.fa, a)
    a = torch.where(uphill, torch.full_like(a, params.astart), a)
    n_pos = torch.where(downhill, state.n_pos + 1, state.n_pos)
    n_pos = torch.where(uphill, torch.zeros_like(n_pos), n_pos)

    v = v + dt[row_system, None] * f
    dr = dt[row_system, None] * v
    dr_norm = safe_sqrt(per_system_sum((dr * dr).sum(-1), row_system, n_sys))
    too_long = dr_norm.detach() > params.maxstep
    scale = torch.where(too_long, params.maxstep / torch.where(too_long, dr_norm, torch.ones_like(dr_norm)),
                        torch.ones_like(dr_norm))
    return FireState(positions=state.positions + dr * scale[row_system, None], velocity=v, dt=dt, alpha=a,
                     n_pos=n_pos, started=torch.ones_like(state.started))


# ---------------------------------------------------------------------------------------------- L-BFGS
#: the initial inverse Hessian of L-BFGS's two-loop recursion (``LBFGSParams.h0``)
LBFGS_H0 = ("scaled", "fixed")


@dataclass(frozen=True)
class LBFGSParams:
    """ASE LBFGS's parameters (same names and defaults as ``ase.optimize.LBFGS``)."""

    maxstep: float = 0.2
    memory: int = 100
    alpha: float = 70.0  # initial Hessian alpha * I, eV/Å²
    #: the two-loop recursion's initial inverse Hessian: "fixed" I / alpha at every step (ASE's LBFGS), or
    #: "scaled" (sᵀy / yᵀy) I from the newest pair of each structure (Nocedal & Wright, eq. 7.20), I / alpha
    #: until the first pair
    h0: str = "fixed"


@dataclass(frozen=True)
class LBFGSState:
    positions: torch.Tensor  # (n_rows, 3)
    previous: torch.Tensor  # (n_rows, 3) positions of the last step (valid once ``started``)
    previous_forces: torch.Tensor  # (n_rows, 3)
    s: torch.Tensor  # (n_rows, memory, 3) position differences, newest first
    y: torch.Tensor  # (n_rows, memory, 3) gradient differences, newest first
    rho: torch.Tensor  # (n_systems, memory) 1 / (y.s) per pair, 0 for an empty slot
    started: torch.Tensor  # (n_systems,) bool

    ROW_FIELDS = ("positions", "previous", "previous_forces", "s", "y")


def lbfgs_init(positions: torch.Tensor, n_systems: int, params: LBFGSParams = LBFGSParams()) -> LBFGSState:
    """L-BFGS state with an empty history."""
    kw = dict(dtype=positions.dtype, device=positions.device)
    history = torch.zeros((positions.shape[0], params.memory, 3), **kw)
    return LBFGSState(positions=positions, previous=torch.zeros_like(positions),
                      previous_forces=torch.zeros_like(positions), s=history, y=history.clone(),
                      rho=torch.zeros((n_systems, params.memory), **kw),
                      started=torch.zeros(n_systems, dtype=torch.bool, device=positions.device))


def _per_system_dot(a: torch.Tensor, b: torch.Tensor, row_system: torch.Tensor, n_systems: int) -> torch.Tensor:
    return per_system_sum((a * b).sum(-1), row_system, n_systems)


@torch.no_grad()
def lbfgs_step(state: LBFGSState, forces: torch.Tensor, row_system: torch.Tensor,
               params: LBFGSParams = LBFGSParams()) -> LBFGSState:
    """One L-BFGS step per structure: add the pair (s, y) of the last step to the structure's history (when
    it has positive curvature, y.s > 0), take the two-loop direction ``-H g`` with ``H0 = I / alpha``, and
    scale it so that its longest row is at most ``maxstep``."""
    n_sys = state.rho.shape[0]
    s_new = state.positions - state.previous
    y_new = state.previous_forces - forces  # gradient difference (g = -F)
    curvature = _per_system_dot(s_new, y_new, row_system, n_sys)
    add = state.started & (curvature > 0)
    rows_add = add[row_system][:, None, None]
    s_hist = torch.where(rows_add, torch.cat([s_new[:, None], state.s[:, :-1]], 1), state.s)
    y_hist = torch.where(rows_add, torch.cat([y_new[:, None], state.y[:, :-1]], 1), state.y)
    rho_new = torch.where(add, 1.0 / torch.where(add, curvature, torch.ones_like(curvature)), torch.zeros_like(curvature))
    rho = torch.where(add[:, None], torch.cat([rho_new[:, None], state.rho[:, :-1]], 1), state.rho)
    q = -forces
    alphas = []
    for i in range(params.memory):  # newest to oldest
        if not bool((rho[:, i] != 0).any()):
            break
        a_i = rho[:, i] * _per_system_dot(s_hist[:, i], q, row_system, n_sys)
        q = q - a_i[row_system, None] * y_hist[:, i]
        alphas.append(a_i)
    if params.h0 == "scaled":
        yy = _per_system_dot(y_hist[:, 0], y_hist[:, 0], row_system, n_sys)
        has_pair = (rho[:, 0] != 0) & (yy > 0)
        gamma = torch.where(has_pair, 1.0 / (rho[:, 0] * torch.where(has_pair, yy, torch.ones_like(yy))),
                            torch.full_like(yy, 1.0 / params.alpha))
        z = q * gamma[row_system, None]
    else:
        z = q / params.alpha
    for i in reversed(range(len(alphas))):  # oldest to newest
        b_i = rho[:, i] * _per_system_dot(y_hist[:, i], z, row_system, n_sys)
        z = z + (alphas[i] - b_i)[row_system, None] * s_hist[:, i]
    step = -z
    longest = torch.zeros(n_sys, dtype=step.dtype, device=step.device).scatter_reduce(
        0, row_system, torch.linalg.vector_norm(step, dim=-1), reduce="amax", include_self=True)
    scale = torch.where(longest >= params.maxstep, params.maxstep / longest.clamp_min(1e-300), torch.ones_like(longest))
    return LBFGSState(positions=state.positions + step * scale[row_system, None], previous=state.positions,
                      previous_forces=forces, s=s_hist, y=y_hist, rho=rho, started=torch.ones_like(state.started))


# ---------------------------------------------------------------------------------------------- masking
def merge_states(active: torch.Tensor, new, old, row_system: torch.Tensor):
    """``new`` for active structures, ``old`` for the rest (frozen), field by field with ``torch.where``."""
    active_rows = active[row_system]
    fields = {}
    for f in dataclasses.fields(old):
        a, b = getattr(new, f.name), getattr(old, f.name)
        mask = active_rows if f.name in old.ROW_FIELDS else active
        fields[f.name] = torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - 1)), a, b)
    return type(old)(**fields)


def select_state(state, systems: torch.Tensor, rows: torch.Tensor):
    """The state of a subset of structures (``rows`` are their rows, in order)."""
    fields = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        fields[f.name] = value[rows] if f.name in state.ROW_FIELDS else value[systems]
    return type(state)(**fields)


def concat_states(first, second, rows: torch.Tensor):
    """The state of ``first``'s structures followed by ``second``'s (the inverse of ``select_state``).

    Per-structure fields are concatenated; row fields are concatenated (``first``'s rows, then ``second``'s)
    and put in the merged order ``rows``, an index into that concatenation (with cell rows the merged layout
    holds the atoms of both before the cell rows of both).
    """
    fields = {}
    for f in dataclasses.fields(first):
        joined = torch.cat([getattr(first, f.name), getattr(second, f.name)])
        fields[f.name] = joined[rows] if f.name in first.ROW_FIELDS else joined
    return type(first)(**fields)
