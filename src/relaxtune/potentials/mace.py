"""MACE from a model file the user passes (optional extra ``mace-torch``), behind ``EnergyModel``.

MACE weights cannot be downloaded here, so only local files are loaded (a pickled ``mace.modules`` model, as
written by ``mace_run_train`` or ``torch.save(model)``). The neighbor list is built once per unroll by
``relaxtune.neighbors``; each step the Cartesian image shifts ``S @ cell`` are recomputed in torch, so the
energy depends on positions and cell differentiably. MACE is asked for the energy only
(``compute_force=False``): forces, stress and second derivatives come from relaxtune's own autograd, which is
what MACE itself would do only in training mode.

Note: mace-torch 0.3.16 pins ``e3nn==0.4.4`` while sevenn 0.13.0 needs ``e3nn>=0.5``; the two cannot share
one environment, so mace-torch is imported lazily and only when a MACE model is requested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from relaxtune.neighbors import NeighborList, build_neighbor_list
from relaxtune.potentials.base import EnergyModel
from relaxtune.state import Batch

MACE_MISSING = (
    "MACE models need the optional package mace-torch (pip install 'mace-torch==0.3.16'); note that it pins "
    "e3nn==0.4.4, which conflicts with sevenn 0.13.0 (e3nn>=0.5): use a separate environment without sevenn"
)


def _require_mace() -> None:
    try:
        import mace  # noqa: F401
    except ImportError as exc:
        raise ImportError(MACE_MISSING) from exc


@dataclass(frozen=True)
class MACEPrepared:
    neighbors: NeighborList
    edge_index: torch.Tensor  # (2, n_pairs): sender i, receiver j
    node_attrs: torch.Tensor  # (n_atoms, n_elements) one-hot
    ptr: torch.Tensor  # (n_systems + 1,)
    head: torch.Tensor  # (n_systems,)


class MACEModel(EnergyModel):
    """A MACE model (path or module) with energies differentiable in positions, cell and parameters."""

    name = "mace"
    # children of ``mace.modules.MACE`` (held as ``self.model``)
    readout_modules = ("readouts",)
    embedding_modules = ("node_embedding", "radial_embedding", "atomic_energies_fn")
    element_embedding_modules = ("node_embedding",)

    def __init__(self, model: str | Path | torch.nn.Module, *, head: str | None = None,
                 dtype: torch.dtype = torch.float32, skin: float = 0.5):
        super().__init__()
        _require_mace()
        if not isinstance(model, torch.nn.Module):
            model = torch.load(Path(model), map_location="cpu", weights_only=False)
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"{model!r} is not a MACE model file (expected a pickled torch module)")
        if hasattr(model, "joint_embedding") or hasattr(model, "les"):
            raise ValueError("MACE models with charge/spin embeddings or electrostatics are not supported")
        self.model = model.to(dtype).eval()
        self.cutoff = float(model.r_max)
        #: neighbour-list padding (Å): pairs within cutoff + skin are listed and those beyond the cutoff masked
        #: in ``energy``, so the energy is exact until an atom moved skin / 2 (the relax loop re-prepares then)
        self.skin = float(skin)
        numbers = [int(z) for z in model.atomic_numbers]
        self.supported_numbers = frozenset(numbers)
        z_to_index = torch.full((max(numbers) + 1,), -1, dtype=torch.long)
        z_to_index[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("z_to_index", z_to_index, persistent=False)
        heads = list(getattr(model, "heads", None) or ["Default"])
        if head is None:
            defaults = [h for h in heads if h.lower() == "default"]
            if len(heads) > 1 and not defaults:
                raise ValueError(f"this MACE model has several heads {heads}: choose one with head=...")
            head = heads[0] if len(heads) == 1 else defaults[0]
        if head not in heads:
            raise ValueError(f"unknown MACE head {head!r}; available: {heads}")
        self.head_index = heads.index(head)

    @torch.no_grad()
    def prepare(self, batch: Batch) -> MACEPrepared:
        self.check_supported(batch)
        nl = build_neighbor_list(batch, self.cutoff + self.skin)
        index = self.z_to_index.to(batch.device)[batch.numbers]
        node_attrs = torch.nn.functional.one_hot(index, len(self.supported_numbers)).to(batch.dtype)
        counts = batch.n_atoms_per_system
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        head = torch.full((batch.n_systems,), self.head_index, dtype=torch.long, device=batch.device)
        return MACEPrepared(nl, torch.stack([nl.i, nl.j]), node_attrs, ptr, head)

    def energy(self, batch: Batch, prepared: MACEPrepared) -> torch.Tensor:
        nl = prepared.neighbors
        positions = batch.positions
        if not positions.requires_grad:  # MACE flags positions as requiring grad in place: not the caller's
            positions = positions.clone()
        cell = batch.cell
        inside = torch.linalg.vector_norm(nl.vectors(positions, cell).detach(), dim=-1) < self.cutoff
        unit_shifts = nl.shifts[inside].to(positions.dtype)
        shifts = torch.einsum("pk,pkl->pl", unit_shifts, cell[nl.system_of_pair[inside]])
        data = {
            "positions": positions,
            "node_attrs": prepared.node_attrs,
            "edge_index": prepared.edge_index[:, inside],
            "shifts": shifts,
            "unit_shifts": unit_shifts,
            "cell": cell,
            "batch": batch.system_idx,
            "ptr": prepared.ptr,
            "head": prepared.head,
        }
        out = self.model(data, training=False, compute_force=False, compute_virials=False, compute_stress=False)
        return out["energy"].reshape(-1)
