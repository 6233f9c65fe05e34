"""The energy/force(/stress) loss of DFT frames, with the graph: the ``forces`` objective and the frame term of
``structure+forces``. Frames go through the model ``frame_chunk`` at a time, so that one chunk's graph is
alive at once."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from relaxtune.data.pairs import dft_frames, frame_stress
from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.state import Batch
from relaxtune.train import losses
from relaxtune.train.config import TrainConfig
from relaxtune.train.frames import frame_rng, sample_frames


class FrameChunk(NamedTuple):
    """Up to ``frame_chunk`` DFT frames of one structure, each frame's weight in its structure's mean, the
    structure's relaxed frame (the energy reference) and whether their stress counts."""

    structure: int
    reference: Any
    frames: list
    weights: list[float]
    use_stress: bool


#: most frames whose topology is kept (a 64-atom CHGNet frame's is about 0.2 MB)
KEPT_TOPOLOGIES = 4096


class FrameLoss:
    """DFT frames of the training pairs (read once) and their loss terms under ``model``."""

    def __init__(self, config: TrainConfig, model: EnergyModel, dtype: torch.dtype, device: torch.device,
                 train_index: dict[int, int]):
        self.config = config
        self.model = model
        self.dtype = dtype
        self.device = device
        self.train_index = train_index  # id(pair) -> training index (the frame draw's key)
        self._cache: dict[int, list] = {}
        self._parts: dict[int, tuple[Any, Any]] = {}  # id(frame) -> (frame, its topology part): frames never move

    def frames(self, pair) -> list:
        """The pair's DFT frames (``relaxtune.data.pairs.dft_frames``), the relaxed one last."""
        key = id(pair)
        if key not in self._cache:
            self._cache[key] = dft_frames(pair)
        return self._cache[key]

    def chunks(self, pairs: Sequence, epoch: int = 0, sample: bool = False) -> list[FrameChunk]:
        """The frames of ``pairs`` in chunks: every frame at weight 1/n, or with ``sample`` the
        ``frames_per_structure`` frames of this epoch's draw (``sample_frames``). The stress counts on a cell
        relaxation always, on a fixed-cell one with ``fixed_cell_stress``."""
        c = self.config
        chunks = []
        for k, pair in enumerate(pairs):
            frames = self.frames(pair)
            index = self.train_index.get(id(pair), k)
            picks = sample_frames(len(frames), c.frames_per_structure if sample else 0, frame_rng(c.seed, epoch, index))
            use_stress = pair.relax_cell or c.fixed_cell_stress
            for i in range(0, len(picks), c.frame_chunk):
                chunk = picks[i:i + c.frame_chunk]
                chunks.append(FrameChunk(k, frames[-1], [frames[j] for j, _ in chunk], [w for _, w in chunk],
                                         use_stress))
        return chunks

    def terms(self, ref, frames: list, use_stress: bool = True) -> torch.Tensor:
        """Loss of each frame (len(frames),): ``force_weight`` x the force MSE, ``energy_weight`` x the squared
        error of the energy relative to the relaxed frame ``ref`` (per atom, or in total eV with
        ``energy_scale="total"``) and, on frames with a DFT stress, ``stress_weight`` x its MSE in GPa."""
        c = self.config
        extra = [a for a in frames if a is not ref]  # the relaxed frame among ``frames`` reuses row 0
        rows = [0 if a is ref else 1 + extra.index(a) for a in frames]
        structures = [ref] + extra
        stresses = [frame_stress(a) if use_stress else None for a in structures]
        with_stress = c.stress_weight > 0 and any(st is not None for st in stresses)
        batch = Batch.from_atoms(structures, dtype=self.dtype, device=self.device)
        ef = energy_and_forces(self.model, batch, self._prepared(structures, batch), create_graph=True,
                               compute_stress=with_stress)
        e_dft = torch.tensor([a.get_potential_energy() for a in structures], dtype=self.dtype, device=self.device)
        f_dft = torch.tensor(np.concatenate([a.get_forces() for a in structures]), dtype=self.dtype,
                             device=self.device)
        e_term = ((ef.energy - ef.energy[0]) - (e_dft - e_dft[0])) ** 2
        if c.energy_scale == "per-atom":
            e_term = e_term / float(len(ref)) ** 2
        f_per = losses.force_loss(ef.forces, f_dft, batch.system_idx, batch.n_systems, batch.fixed)
        terms = c.energy_weight * e_term + c.force_weight * f_per
        if with_stress:
            has = torch.tensor([st is not None for st in stresses], device=self.device)
            s_dft = torch.tensor(np.stack([np.zeros((3, 3)) if st is None else st for st in stresses]),
                                 dtype=self.dtype, device=self.device)
            s_term = losses.stress_loss(ef.stress, s_dft)
            terms = terms + c.stress_weight * torch.where(has, s_term, torch.zeros_like(s_term))
        return terms[torch.tensor(rows, dtype=torch.long, device=terms.device)]

    def _prepared(self, structures: list, batch: Batch) -> Any:
        """The topology of ``batch`` (these frames): each frame's part is built once and kept (frames never move;
        the first ``KEPT_TOPOLOGIES`` frames), and the parts are joined per call; a model that does not split its
        topology prepares the batch."""
        missing = [k for k, a in enumerate(structures) if self._parts.get(id(a), (None,))[0] is not a]
        fresh = {}
        if missing:
            parts = self.model.prepare_parts(batch.select(missing))
            if parts is None:
                return self.model.prepare(batch)
            fresh = {id(structures[k]): part for k, part in zip(missing, parts)}
            for k in missing[:max(0, KEPT_TOPOLOGIES - len(self._parts))]:
                self._parts[id(structures[k])] = (structures[k], fresh[id(structures[k])])
        return self.model.join_parts([fresh[id(a)] if id(a) in fresh else self._parts[id(a)][1] for a in structures],
                                     batch)
