"""Classical potentials in pure torch: Lennard-Jones and Stillinger-Weber (Si), for fast exact tests.

Both are ``EnergyModel``s over a full neighbour list (``relaxtune.neighbors``): the list (indices, integer
image shifts, and for Stillinger-Weber the bond triplets) is built once in ``prepare`` with a cutoff padded by
``skin``; ``energy`` rebuilds edge vectors from the current positions and cell in torch and masks pairs beyond
the true cutoff, so energies, forces, stress and their derivatives (also w.r.t. the potential parameters) are
exact as long as no atom moved more than ``skin / 2`` since ``prepare`` (the relax loop re-prepares then).
Every continuous parameter is a ``torch.nn.Parameter``; ``model.double()`` gives float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relaxtune.neighbors import NeighborList, build_neighbor_list
from relaxtune.potentials.base import EnergyModel
from relaxtune.state import Batch


def _param(value: float) -> torch.nn.Parameter:
    """A scalar parameter kept in float64 (0-dim, so it does not promote float32 inputs; cast with .float())."""
    return torch.nn.Parameter(torch.tensor(float(value), dtype=torch.float64))


class LennardJones(EnergyModel):
    """Lennard-Jones pair potential with the conventions of ``ase.calculators.lj.LennardJones``.

    ``u(r) = 4 epsilon ((sigma/r)^12 - (sigma/r)^6)`` for r <= rc (default 3 sigma), shifted to 0 at rc, or, with
    ``smooth=True``, multiplied by ASE's (JAX-MD's) C^1 cutoff function between ro (default 0.66 rc) and rc.
    ``sigma`` and ``epsilon`` are trainable; rc and ro are fixed at construction.
    """

    name = "lj"
    supported_numbers = None

    def __init__(self, sigma: float = 1.0, epsilon: float = 1.0, rc: float | None = None,
                 ro: float | None = None, smooth: bool = False, skin: float = 0.3):
        super().__init__()
        self.sigma = _param(sigma)
        self.epsilon = _param(epsilon)
        self.rc = float(3.0 * sigma if rc is None else rc)
        self.ro = float(0.66 * self.rc if ro is None else ro)
        self.smooth = bool(smooth)
        #: neighbour-list padding (Å); the relax loop re-prepares after moves of more than skin / 2.
        self.skin = float(skin)

    @property
    def cutoff(self) -> float:
        return self.rc

    def prepare(self, batch: Batch) -> NeighborList:
        return build_neighbor_list(batch, self.rc + self.skin)

    def energy(self, batch: Batch, prepared: NeighborList) -> torch.Tensor:
        vec = prepared.vectors(batch.positions, batch.cell)
        r2 = (vec * vec).sum(-1)
        rc2 = self.rc**2
        inside = r2 <= rc2
        r2 = torch.where(inside, r2, torch.full_like(r2, rc2))  # safe value outside: no inf/NaN in any derivative
        c6 = (self.sigma**2 / r2) ** 3
        pair = 4.0 * self.epsilon * (c6 * c6 - c6)
        if self.smooth:
            ro2 = self.ro**2
            fc = (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3
            pair = pair * torch.where(r2 < ro2, torch.ones_like(r2), fc)
        else:
            e0 = 4.0 * self.epsilon * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
            pair = pair - e0
        pair = torch.where(inside, pair, torch.zeros_like(pair))
        out = torch.zeros(batch.n_systems, dtype=pair.dtype, device=pair.device)
        return 0.5 * out.index_add(0, prepared.system_of_pair, pair)


#: F. Stillinger and T. Weber, Phys. Rev. B 31, 5262 (1985), silicon (eV, Å).
SW_SI_1985 = dict(epsilon=2.1683, sigma=2.0951, A=7.049556277, B=0.6022245584, p=4.0, a=1.80,
                  lambda1=21.0, gamma=1.20, costheta0=1.0 / 3.0)


@dataclass(frozen=True)
class SWTopology:
    """Neighbour list plus the bond pairs (e1 = i->j, e2 = i->k, e1 != e2) sharing a centre atom."""

    nl: NeighborList
    e1: torch.Tensor  # (n_triplets,) long, indices into the pair list
    e2: torch.Tensor


def _triplets(nl: NeighborList, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs of distinct edges with the same centre atom (vectorised, no Python loop)."""
    device = nl.i.device
    order = torch.argsort(nl.i, stable=True)
    counts = torch.bincount(nl.i, minlength=n_atoms)
    starts = torch.cumsum(counts, 0) - counts
    per_edge = counts[nl.i[order]]  # partners of each (sorted) edge, itself included
    e1_sorted = torch.repeat_interleave(torch.arange(len(order), device=device), per_edge)
    first = torch.repeat_interleave(torch.cumsum(per_edge, 0) - per_edge, per_edge)
    e2_sorted = starts[nl.i[order]][e1_sorted] + torch.arange(len(e1_sorted), device=device) - first
    keep = e1_sorted != e2_sorted
    return order[e1_sorted[keep]], order[e2_sorted[keep]]


class StillingerWeber(EnergyModel):
    """Stillinger-Weber potential for Si (original 1985 parameters), same functional form as matscipy's.

    E = 1/2 sum_{i,j} phi2(r_ij) + 1/2 sum_i sum_{j != k} lambda eps exp(gamma sigma/(r_ij - a sigma))
        exp(gamma sigma/(r_ik - a sigma)) (cos theta_jik + 1/3)^2, every term zero beyond a sigma,
    phi2(r) = A eps (B (sigma/r)^p - 1) exp(sigma/(r - a sigma)).
    epsilon, sigma, A, B, lambda1 and gamma are trainable; p, a and cos(theta0) are fixed.
    """

    name = "sw"
    supported_numbers = frozenset({14})

    def __init__(self, skin: float = 0.3, **overrides: float):
        super().__init__()
        p = {**SW_SI_1985, **overrides}
        for key in ("epsilon", "sigma", "A", "B", "lambda1", "gamma"):
            setattr(self, key, _param(p[key]))
        self.p = float(p["p"])
        self.a = float(p["a"])
        self.costheta0 = float(p["costheta0"])
        #: neighbour-list padding (Å); the relax loop re-prepares after moves of more than skin / 2.
        self.skin = float(skin)

    @property
    def cutoff(self) -> float:
        return self.a * float(self.sigma.detach())

    def prepare(self, batch: Batch) -> SWTopology:
        nl = build_neighbor_list(batch, self.cutoff + self.skin)
        e1, e2 = _triplets(nl, batch.n_atoms)
        return SWTopology(nl=nl, e1=e1, e2=e2)

    def energy(self, batch: Batch, prepared: SWTopology) -> torch.Tensor:
        nl = prepared.nl
        vec = nl.vectors(batch.positions, batch.cell)
        r = torch.linalg.vector_norm(vec, dim=-1)
        rc = self.a * self.sigma
        inside = r < rc
        r_safe = torch.where(inside, r, torch.zeros_like(r))  # finite everywhere, incl. all derivatives
        zero = torch.zeros_like(r)
        inv_gap = 1.0 / (r_safe - rc)
        r_div = torch.where(inside, r, torch.ones_like(r))
        phi2 = self.A * self.epsilon * (self.B * (self.sigma / r_div) ** self.p - 1.0) * torch.exp(self.sigma * inv_gap)
        phi2 = torch.where(inside, phi2, zero)
        radial = torch.where(inside, torch.exp(self.gamma * self.sigma * inv_gap), zero)

        e1, e2 = prepared.e1, prepared.e2
        both = inside[e1] & inside[e2]
        cos = (vec[e1] * vec[e2]).sum(-1) / (r_div[e1] * r_div[e2])
        phi3 = self.lambda1 * self.epsilon * radial[e1] * radial[e2] * (cos + self.costheta0) ** 2
        phi3 = torch.where(both, phi3, torch.zeros_like(phi3))

        out = torch.zeros(batch.n_systems, dtype=r.dtype, device=r.device)
        out = out.index_add(0, nl.system_of_pair, 0.5 * phi2)
        return out.index_add(0, nl.system_of_pair[e1], 0.5 * phi3)
