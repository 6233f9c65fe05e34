"""CHGNet (pretrained 0.3.0 weights from the wheel) behind the ``EnergyModel`` interface.

CHGNet's own path (``CrystalGraph`` -> ``BatchedGraph.from_graphs``) rebuilds bond vectors from fractional
coordinates per graph in a Python loop, and its stress uses a detached cell volume. Here the crystal graphs
are built per structure in ``CHGNetModel.prepare_parts`` (pymatgen neighbor search with CHGNet's cutoffs plus a
skin, so that they stay exact while atoms move less than skin / 2), their index tensors concatenated with
offsets into one batched topology (``join_parts``), and
``CHGNetModel.energy`` computes every bond vector in one vectorised torch expression from the current
Cartesian positions and cells:

    bond = X[center] - (X[neighbor] + image @ cell)          (CHGNet's sign convention)

then feeds CHGNet's own basis expansions and message-passing layers (``CHGNet._compute``). The energy is
thus differentiable in positions, cell and parameters to any order, and no graph is re-converted per step.
CHGNet predicts energy per atom: it is multiplied back by the atom count, and the AtomRef composition
energy (a linear function of element counts) is added extensively.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from relaxtune.potentials.base import EnergyModel
from relaxtune.state import Batch


@dataclass(frozen=True)
class CHGNetPrepared:
    """Batched CHGNet topology (all indices global over the batch, long tensors)."""

    atomic_numbers: torch.Tensor  # (n_atoms,)
    atom_owners: torch.Tensor  # (n_atoms,) system of each atom
    atom_graph: torch.Tensor  # (n_dir, 2) center, neighbor
    image: torch.Tensor  # (n_dir, 3) integer-valued image of the neighbor (float)
    edge_system: torch.Tensor  # (n_dir,) system of each directed edge
    directed2undirected: torch.Tensor  # (n_dir,)
    undirected2directed: torch.Tensor  # (n_und,)
    bond_graph: torch.Tensor  # (n_angle, 5) atom, und_1, dir_1, und_2, dir_2
    composition: torch.Tensor  # (n_systems, 94) element counts
    n_atoms: torch.Tensor  # (n_systems,)
    graphs: tuple  # the CrystalGraphs (only used for custom, non-AtomRef composition models)


@dataclass(frozen=True)
class _GraphPart:
    """One structure's crystal graph, indices local to it (``CHGNetModel.prepare_parts``)."""

    graph: Any  # the CrystalGraph
    atom_graph: torch.Tensor  # (n_dir, 2) center, neighbor
    image: torch.Tensor  # (n_dir, 3) float64 image of the neighbor, in our unwrapped coordinates
    directed2undirected: torch.Tensor
    undirected2directed: torch.Tensor
    bond_graph: torch.Tensor  # (n_angle, 5)


def _quiet():
    """CHGNet prints on load; keep stdout clean (CLI output, test logs)."""
    return contextlib.redirect_stdout(io.StringIO())


#: Å; see ``CHGNetModel.skin``
DEFAULT_SKIN = 0.5


class CHGNetModel(EnergyModel):
    """CHGNet with differentiable energies in positions and cell, batched over structures.

    ``model``: a ``chgnet.model.CHGNet`` instance (default: the pretrained ``model_name`` from the wheel).
    """

    name = "chgnet"
    supported_numbers = frozenset(range(1, 95))
    # children of ``chgnet.model.CHGNet`` (held as ``self.model``)
    readout_modules = ("mlp", "readout_norm")
    embedding_modules = ("atom_embedding", "bond_basis_expansion", "bond_embedding", "bond_weights_ag",
                         "bond_weights_bg", "angle_basis_expansion", "angle_embedding", "composition_model")
    element_embedding_modules = ("atom_embedding",)

    def __init__(self, model=None, *, model_name: str = "0.3.0", dtype: torch.dtype = torch.float32,
                 skin: float = DEFAULT_SKIN):
        super().__init__()
        from chgnet.graph import CrystalGraphConverter

        if model is None:
            from chgnet.model import CHGNet

            with _quiet():
                model = CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)
        model.graph_converter.set_isolated_atom_response("warn")
        self.model = model.to(dtype).eval()
        #: graph padding (Å): graphs are built with both of CHGNet's cutoffs (atom graph 6 Å, bond graph 3 Å)
        #: plus ``skin``. CHGNet's smooth envelopes vanish beyond its cutoffs, so the extra edges add exactly
        #: nothing and the energy is exact until an atom moved skin / 2 (the relax loop re-prepares then).
        self.skin = float(skin)
        own = model.graph_converter
        padded = CrystalGraphConverter(atom_graph_cutoff=own.atom_graph_cutoff + self.skin,
                                       bond_graph_cutoff=own.bond_graph_cutoff + self.skin,
                                       algorithm=own.algorithm, on_isolated_atoms="warn")
        self.__dict__["padded_converter"] = padded  # not a submodule: no state of its own

    @property
    def cutoff(self) -> float:
        return float(self.model.graph_converter.atom_graph_cutoff)

    # ------------------------------------------------------------------ topology (once per unroll)
    def prepare(self, batch: Batch) -> CHGNetPrepared:
        return self.join_parts(self.prepare_parts(batch), batch)

    @torch.no_grad()
    def prepare_parts(self, batch: Batch) -> list[_GraphPart]:
        """Each structure's crystal graph (pymatgen neighbour search), indices local to the structure."""
        from pymatgen.core import Lattice, Structure

        self.check_supported(batch)
        pos = batch.positions.detach().cpu().double().numpy()
        cells = batch.cell.detach().cpu().double().numpy()
        pbc = batch.pbc.cpu().numpy()
        numbers = batch.numbers.cpu().numpy()
        parts = []
        for k, sl in enumerate(batch.system_slices()):
            if abs(np.linalg.det(cells[k])) < 1e-6:  # pymatgen needs a lattice even along non-periodic axes
                raise ValueError(f"structure {k}: CHGNet needs a cell with nonzero volume (put molecules in a box)")
            structure = Structure(
                Lattice(cells[k], pbc=tuple(bool(p) for p in pbc[k])), numbers[sl], pos[sl],
                coords_are_cartesian=True,
            )
            with _quiet():
                graph = self.padded_converter(structure)
            ag = graph.atom_graph.long().reshape(-1, 2)
            img = graph.neighbor_image.double().reshape(-1, 3).numpy()
            # CHGNet's images refer to its own fractional coordinates; should pymatgen ever wrap them, shift
            # the images so that X[j] + image @ cell still names the same neighbor for our unwrapped X.
            frac_ours = pos[sl] @ np.linalg.inv(cells[k])
            wrap = np.rint(graph.atom_frac_coord.detach().double().numpy() - frac_ours)
            if ag.shape[0] and np.any(wrap):
                ag_np = ag.numpy()
                img = img + wrap[ag_np[:, 1]] - wrap[ag_np[:, 0]]
            parts.append(_GraphPart(graph=graph, atom_graph=ag, image=torch.as_tensor(img),
                                    directed2undirected=graph.directed2undirected.long(),
                                    undirected2directed=graph.undirected2directed.long(),
                                    bond_graph=graph.bond_graph.long().reshape(-1, 5)))
        return parts

    def join_parts(self, parts: Sequence[_GraphPart], batch: Batch) -> CHGNetPrepared:
        """The batched topology: each structure's indices shifted past the atoms, directed and undirected edges
        of the structures before it."""
        atom_graph, image, edge_sys, d2u, u2d, bond_graph = [], [], [], [], [], []
        atom_off = dir_off = und_off = 0
        for k, (part, sl) in enumerate(zip(parts, batch.system_slices())):
            ag = part.atom_graph
            atom_graph.append(ag + atom_off)
            image.append(part.image)
            edge_sys.append(torch.full((ag.shape[0],), k, dtype=torch.long))
            d2u.append(part.directed2undirected + und_off)
            u2d.append(part.undirected2directed + dir_off)
            if part.bond_graph.shape[0]:
                bond_graph.append(part.bond_graph + torch.tensor([atom_off, und_off, dir_off, und_off, dir_off]))
            atom_off += sl.stop - sl.start
            dir_off += ag.shape[0]
            und_off += part.undirected2directed.shape[0]

        device, dtype = batch.device, batch.dtype
        n_sys = batch.n_systems
        composition = torch.zeros(n_sys, 94, dtype=dtype)
        composition.index_put_(
            (batch.system_idx.cpu(), batch.numbers.cpu() - 1), torch.ones(batch.n_atoms, dtype=dtype), accumulate=True
        )
        return CHGNetPrepared(
            atomic_numbers=batch.numbers.to(device),
            atom_owners=batch.system_idx.to(device),
            atom_graph=torch.cat(atom_graph).to(device),
            image=torch.cat(image).to(device=device, dtype=dtype),
            edge_system=torch.cat(edge_sys).to(device),
            directed2undirected=torch.cat(d2u).to(device),
            undirected2directed=torch.cat(u2d).to(device),
            bond_graph=(torch.cat(bond_graph) if bond_graph else torch.zeros(0, 5, dtype=torch.long)).to(device),
            composition=composition.to(device),
            n_atoms=batch.n_atoms_per_system.to(device),
            graphs=tuple(part.graph for part in parts),
        )

    # ------------------------------------------------------------------ energy (every step)
    def energy(self, batch: Batch, prepared: CHGNetPrepared) -> torch.Tensor:
        from chgnet.model.composition_model import AtomRef
        from chgnet.model.model import BatchedGraph

        p, m = prepared, self.model
        X, cell = batch.positions, batch.cell
        center = p.atom_graph[:, 0]
        neighbor = p.atom_graph[:, 1]
        shift = torch.einsum("ek,ekl->el", p.image, cell[p.edge_system])
        bond = X[center] - (X[neighbor] + shift)
        length = torch.linalg.norm(bond, dim=1)
        unit = bond / length[:, None]
        und_length = length[p.undirected2directed]
        encoder = m.bond_basis_expansion
        bond_bases_ag = encoder.rbf_expansion_ag(und_length)
        bond_bases_bg = encoder.rbf_expansion_bg(und_length)
        if p.bond_graph.shape[0]:
            angle_bases = m.angle_basis_expansion(unit[p.bond_graph[:, 2]], unit[p.bond_graph[:, 4]])
            bond_graph = p.bond_graph[:, [0, 1, 3]]
        else:
            angle_bases = torch.tensor([], dtype=X.dtype, device=X.device)
            bond_graph = torch.tensor([], dtype=torch.long, device=X.device)
        graph = BatchedGraph(
            atomic_numbers=p.atomic_numbers,
            bond_bases_ag=bond_bases_ag,
            bond_bases_bg=bond_bases_bg,
            angle_bases=angle_bases,
            batched_atom_graph=p.atom_graph,
            batched_bond_graph=bond_graph,
            atom_owners=p.atom_owners,
            directed2undirected=p.directed2undirected,
            atom_positions=[],
            strains=[],
            volumes=torch.empty(0),
        )
        energy = m._compute(graph)["e"]
        if m.is_intensive:
            energy = energy * p.n_atoms.to(energy.dtype)
        comp = m.composition_model
        if comp is None:
            return energy
        if isinstance(comp, AtomRef):
            # fc over element counts: sum of per-element reference energies, exactly extensive
            return energy + comp.fc(p.composition).view(-1)
        comp_energy = comp(list(p.graphs))
        if m.is_intensive:
            comp_energy = comp_energy * p.n_atoms.to(energy.dtype)
        return energy + comp_energy
