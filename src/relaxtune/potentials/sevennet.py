"""SevenNet-0 (weights in the sevenn wheel) behind the ``EnergyModel`` interface.

SevenNet's ASE calculator computes edge vectors in numpy and differentiates the energy w.r.t. that leaf
tensor, so forces never depend on a positions tensor (a relaxation through it would see frozen forces). Here
the neighbor list (indices + integer image shifts) is built once per unroll with
``relaxtune.neighbors.build_neighbor_list`` at the model cutoff, edge vectors ``X[j] - X[i] + S @ cell`` are
computed in torch every step, and fed to SevenNet's network with its force/stress output module removed:
the network then maps positions and cells to per-structure energies, differentiable to any order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from relaxtune.neighbors import NeighborList, build_neighbor_list
from relaxtune.potentials.base import EnergyModel
from relaxtune.state import Batch


@dataclass(frozen=True)
class SevenNetPrepared:
    neighbors: NeighborList
    edge_index: torch.Tensor  # (2, n_pairs): [i, j] as SevenNet expects (src, dst)


class _CastOutputs(torch.nn.Module):
    """Run a SevenNet data->data module and cast the floating tensors it wrote to ``dtype``."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, data: dict) -> dict:
        before = {k: id(v) for k, v in data.items()}
        data = self.module(data)
        for k, v in data.items():
            if before.get(k) != id(v) and torch.is_tensor(v) and v.is_floating_point():
                data[k] = v.to(self.dtype)
        return data


class SevenNetModel(EnergyModel):
    """SevenNet energies with edge vectors built in torch from positions and cell.

    ``model``: a checkpoint name or path understood by ``sevenn.util.load_checkpoint`` (default ``7net-0``,
    the only one shipped in the wheel), or an ``AtomGraphSequential`` with ``cutoff`` and ``type_map`` set.
    """

    name = "sevennet"
    # modules of SevenNet's ``AtomGraphSequential`` (held as ``self.net``)
    readout_modules = ("reduce_input_to_hidden", "reduce_hidden_to_energy", "rescale_atomic_energy")
    embedding_modules = ("edge_embedding", "onehot_to_feature_x")
    element_embedding_modules = ("onehot_to_feature_x",)

    def __init__(self, model="7net-0", *, dtype: torch.dtype = torch.float32, skin: float = 0.5):
        super().__init__()
        from sevenn.nn.sequential import AtomGraphSequential

        if isinstance(model, AtomGraphSequential):
            net = copy.deepcopy(model)
            cutoff, type_map = float(net.cutoff), dict(net.type_map)
        else:
            import sevenn.util

            checkpoint = sevenn.util.load_checkpoint(str(model))
            net = checkpoint.build_model()
            cutoff, type_map = float(checkpoint.config["cutoff"]), dict(checkpoint.config["_type_map"])
        if getattr(net, "modal_map", None):
            raise ValueError("multi-fidelity SevenNet models are not supported (7net-0 is single-fidelity)")
        # Energy only: forces/stress come from relaxtune's autograd over positions, cell and strain.
        net.delete_module_by_key("force_output")
        net.key_grad = None  # do not flag the edge vectors as leaves; they derive from positions
        net.set_is_batch_data(True)
        if dtype != torch.float32 and "onehot_idx_to_onehot" in net._modules:
            # SevenNet's one-hot embedding hard-codes float32; cast it so float64 (gradcheck) works
            net.replace_module("onehot_idx_to_onehot", _CastOutputs(net._modules["onehot_idx_to_onehot"], dtype))
        self.net = net.to(dtype).eval()
        self.cutoff = cutoff
        #: neighbour-list padding (Å): pairs within cutoff + skin are listed and those beyond the cutoff masked
        #: in ``energy``, so the energy is exact until an atom moved skin / 2 (the relax loop re-prepares then)
        self.skin = float(skin)
        self.type_map = type_map
        self.supported_numbers = frozenset(int(z) for z in type_map)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``Module.load_state_dict``, tolerant of e3nn's fx constants (``._tensor_constantN``), which
        appear as extra entries once a SevenNet network has been deep-copied: they are fixed Clebsch-Gordan
        tables, not weights, so each side keeps its own."""
        own = self.state_dict()
        state = {k: v for k, v in state_dict.items() if "._tensor_constant" not in k or k in own}
        state.update({k: v for k, v in own.items() if "._tensor_constant" in k and k not in state})
        return super().load_state_dict(state, strict=strict, assign=assign)

    @torch.no_grad()
    def prepare(self, batch: Batch) -> SevenNetPrepared:
        self.check_supported(batch)
        nl = build_neighbor_list(batch, self.cutoff + self.skin)
        return SevenNetPrepared(neighbors=nl, edge_index=torch.stack([nl.i, nl.j]))

    def energy(self, batch: Batch, prepared: SevenNetPrepared) -> torch.Tensor:
        vectors = prepared.neighbors.vectors(batch.positions, batch.cell)
        inside = torch.linalg.vector_norm(vectors.detach(), dim=-1) < self.cutoff
        vectors, edge_index = vectors[inside], prepared.edge_index[:, inside]
        data = {
            "atomic_numbers": batch.numbers,
            "x": batch.numbers,  # replaced by the one-hot index in the network's preprocessing
            "pos": batch.positions,
            "edge_index": edge_index,
            "edge_vec": vectors,
            "batch": batch.system_idx,
            "num_atoms": batch.n_atoms_per_system,
        }
        out = self.net(data)
        energy = out["inferred_total_energy"].reshape(-1)
        if energy.shape[0] != batch.n_systems:  # AtomReduce sizes by the last structure index
            raise RuntimeError(f"SevenNet returned {energy.shape[0]} energies for {batch.n_systems} structures")
        return energy
