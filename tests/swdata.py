"""Synthetic relaxation pairs from Stillinger-Weber: the 'DFT' reference is SW with changed parameters, so a
fine-tuned SW can learn its way towards it (fast, exact, float64)."""

import numpy as np
import torch
from ase.build import bulk

from relaxtune.data import RelaxationPair
from relaxtune.potentials.base import energy_and_forces
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.relax import RelaxConfig, relax
from relaxtune.state import Batch

TRUTH = dict(sigma=2.0951 * 1.015, lambda1=23.0)

#: a trainer recipe for SW pairs (fast, exact in float64): the reference method's loss, Dq from the initial
#: structures; no self-distillation or retention check, since the synthetic "DFT" is another SW, wrong in bulk
#: too (keeping the pretrained bulk is tests/train/test_distill.py's subject)
SW_TRAINING = dict(model="sw", dtype="float64", optimizer="gd", steps=300, fmax=1e-3, batch_size=2, lr=3e-3,
                   eval_fmax=1e-3, eval_optimizer="fire", objective="structure", val_start="initial",
                   start="initial", dq_scale="absolute", distill_weight=0.0, retention_check=False)


def make_sw_pairs(n: int, seed: int = 0, with_trajectory: bool = False) -> list[RelaxationPair]:
    truth = StillingerWeber(**TRUTH)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 1, 1)
        if k % 2 == 0:
            del a[k]
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        b = Batch.from_atoms([a], dtype=torch.float64)
        r = relax(truth, b, RelaxConfig(fmax=1e-4, max_steps=1000), record_trace=with_trajectory)
        final = r.batch.to_atoms()[0]
        traj = None
        if with_trajectory:
            from ase.calculators.singlepoint import SinglePointCalculator

            traj = []
            for pos in (a.positions, 0.5 * (a.positions + final.positions), final.positions):
                f = a.copy()
                f.positions = pos
                fb = Batch.from_atoms([f], dtype=torch.float64)
                ef = energy_and_forces(truth, fb, truth.prepare(fb))
                f.calc = SinglePointCalculator(f, energy=float(ef.energy[0]), forces=ef.forces.numpy())
                traj.append(f)
        out.append(RelaxationPair(name=f"sw{k}", group=f"g{k}", initial=a, final=final,
                                  energy_final=float(r.energy[0]), trajectory=traj))
    return out



def write_sw_dataset(directory, n: int = 6, seed: int = 0, splits: dict | None = None):
    """The SW pairs as a dataset folder: one extxyz trajectory per structure (name/group in frame 0's info,
    energy and forces on every frame) and a splits.json. Returns the pairs."""
    import json
    from pathlib import Path

    from ase.io import write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = make_sw_pairs(n, seed=seed, with_trajectory=True)
    for p in pairs:
        frames = [a.copy() for a in p.trajectory]
        for a, src in zip(frames, p.trajectory):
            a.calc = src.calc
        frames[0].info.update(name=p.name, group=p.group)
        write(directory / f"{p.name}.extxyz", frames)
    if splits is None:
        groups = [p.group for p in pairs]
        splits = {"train": groups[: n - 2], "val": groups[n - 2: n - 1], "test": groups[n - 1:]}
    (directory / "splits.json").write_text(json.dumps(splits))
    return pairs


def make_cell_relaxation(vacancy: bool = False, seed: int = 4) -> tuple[RelaxationPair, list]:
    """A strained, rattled Si8 (Si15 with a vacancy: atoms whose relaxed positions depend on the potential)
    relaxed with the cell free by the reference SW: the pair and its two frames (initial, relaxed), each with
    energy, forces and stress."""
    from ase.calculators.singlepoint import SinglePointCalculator

    truth = StillingerWeber(**TRUTH)
    start = bulk("Si", "diamond", a=5.43, cubic=True)
    if vacancy:
        start = start * (2, 1, 1)
        del start[0]
    start.rattle(0.05, seed=seed)
    start.set_cell(start.cell.array @ np.diag([1.03, 0.98, 1.01]), scale_atoms=True)
    result = relax(truth, Batch.from_atoms([start], dtype=torch.float64),
                   RelaxConfig(fmax=1e-5, max_steps=2000, relax_cell=True))
    assert bool(result.converged[0])
    frames = []
    for atoms in (start, result.batch.to_atoms()[0]):
        batch = Batch.from_atoms([atoms], dtype=torch.float64)
        ef = energy_and_forces(truth, batch, truth.prepare(batch), compute_stress=True)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=float(ef.energy[0]), forces=ef.forces.numpy(),
                                           stress=ef.stress[0].numpy())
        frames.append(frame)
    pair = RelaxationPair(name="si8_cell", group="cell", initial=frames[0], final=frames[-1],
                          energy_final=frames[-1].get_potential_energy(), trajectory=frames, relax_cell=True)
    return pair, frames
