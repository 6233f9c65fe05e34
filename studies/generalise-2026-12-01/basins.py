"""Why interstitials miss DFT's basin (docs/results.md, "Update, 2026-12-02, morning").

    python basins.py [--model chgnet|RUN/best.pt] [NAME ...]      # default: int_T_2 int_B_2 int_P_1 int_P_2
    python basins.py --starts 7 int_T_2 int_P_1                    # and from 7 starts 0.4 Å off the site

For each shipped Si-defect structure NAME (an interstitial: the last atom), one row per question:

- *where*: how far the interstitial moved from its start (the rattled T site) in DFT and in the model's FIRE
  relaxation (fmax 0.02, as ``relaxtune evaluate``), and the distances to its six nearest atoms;
- *symmetric Dq*: Dq of the model's relaxed structure to DFT's after the best of the symmetry operations of the
  unrattled defect cell (spglib), i.e. whether the model found DFT's configuration in another, equivalent
  orientation;
- *trapped*: the model's energy at the minimum it reaches from the initial structure against the one it reaches
  from the DFT-relaxed structure (negative: DFT's configuration is lower in the model too, so the model is
  trapped in a metastable basin rather than wrong about the ground state);
- *first force*: DFT's and the model's force on the interstitial in the initial frame, projected on its offset
  from the ideal site (positive: pushed away from the site);
- with ``--starts N``: the energy, Dq and symmetric Dq of relaxations from N more starts with the interstitial
  moved ``--offset`` Å (0.4) from its initial position in random directions (numpy default_rng(0)).
"""
from __future__ import annotations

import argparse

import numpy as np
import spglib
import torch
from ase.io import read

from relaxtune.data.builders import si_defect
from relaxtune.data.registry import builtin_path
from relaxtune.potentials import load_model
from relaxtune.potentials.base import energy_and_forces
from relaxtune.relax import RelaxConfig, relax
from relaxtune.state import Batch

FIRE = RelaxConfig(optimizer="fire", fmax=0.02, max_steps=800)  # as `relaxtune evaluate`, with room to converge


def site_symmetry_permutations(ideal) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rotation, translation, atom permutation) of every symmetry operation of the unrattled cell."""
    frac = ideal.get_scaled_positions()
    sym = spglib.get_symmetry((ideal.cell.array, frac, ideal.numbers), symprec=1e-3)
    out = []
    for rot, trans in zip(sym["rotations"], sym["translations"]):
        diff = (frac @ rot.T + trans)[:, None, :] - frac[None, :, :]
        dist = np.linalg.norm((diff - np.round(diff)) @ ideal.cell.array, axis=2)
        perm = dist.argmin(1)
        if dist[np.arange(len(frac)), perm].max() < 1e-2 and len(set(perm)) == len(perm):
            out.append((rot, trans, perm))
    return out


def mic(d: np.ndarray, cell: np.ndarray) -> np.ndarray:
    frac = d @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell


def dq(x: np.ndarray, ref: np.ndarray, cell: np.ndarray, masses: np.ndarray) -> float:
    return float(np.sqrt((masses[:, None] * mic(x - ref, cell) ** 2).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=["int_T_2", "int_B_2", "int_P_1", "int_P_2"])
    p.add_argument("--model", default="chgnet")
    p.add_argument("--starts", type=int, default=0)
    p.add_argument("--offset", type=float, default=0.4)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    folder = builtin_path("si-defects")
    for name in args.names:
        frames = read(folder / f"{name}.extxyz", ":")
        initial, final = frames[0], frames[-1]
        cell, masses, i = initial.cell.array, initial.get_masses(), len(initial) - 1
        batch = Batch.from_atoms([initial, final])
        with torch.no_grad():
            res = relax(model, batch, FIRE, grad_mode="none")
        x = res.batch.positions.detach().double().numpy().reshape(2, -1, 3)
        energy = res.energy.detach().double().numpy()
        ideal = si_defect(name.rsplit("_", 1)[0])
        ops = site_symmetry_permutations(ideal)

        def symmetric_dq(y: np.ndarray) -> float:
            return min(dq(_apply(y, rot, trans, perm, cell), final.get_positions(), cell, masses)
                       for rot, trans, perm in ops)

        sym = symmetric_dq(x[0])
        first = Batch.from_atoms([initial])
        f_model = energy_and_forces(model, first, model.prepare(first)).forces[i].detach().double().numpy()
        offset = initial.get_positions()[i] - ideal.get_positions()[i]
        u = offset / np.linalg.norm(offset)
        moved = {tag: np.linalg.norm(mic(pos[i] - initial.get_positions()[i], cell))
                 for tag, pos in (("DFT", final.get_positions()), ("model", x[0]))}
        near = {tag: np.sort(np.linalg.norm(mic(pos[:i] - pos[i], cell), axis=1))[:6]
                for tag, pos in (("DFT", final.get_positions()), ("model", x[0]))}
        print(f"{name} ({args.model}): Dq {dq(x[0], final.get_positions(), cell, masses):.3f}, symmetric Dq "
              f"{sym:.3f}; interstitial moved DFT {moved['DFT']:.2f} Å, model {moved['model']:.2f} Å; "
              f"nearest DFT {np.round(near['DFT'], 2).tolist()}, model {np.round(near['model'], 2).tolist()}; "
              f"model E from DFT-relaxed − from initial {energy[1] - energy[0]:+.3f} eV (its minimum from "
              f"DFT-relaxed is {np.abs(mic(x[1] - final.get_positions(), cell)).max():.2f} Å from DFT's); "
              f"first-frame force along the offset DFT {frames[0].get_forces()[i] @ u:+.3f}, model "
              f"{f_model @ u:+.3f} eV/Å", flush=True)
        if args.starts:
            rng = np.random.default_rng(0)
            starts = []
            for _ in range(args.starts):
                moved_start = initial.copy()
                step = rng.normal(size=3)
                moved_start.positions[i] += args.offset * step / np.linalg.norm(step)
                starts.append(moved_start)
            with torch.no_grad():
                res = relax(model, Batch.from_atoms(starts), FIRE, grad_mode="none")
            xs = res.batch.positions.detach().double().numpy().reshape(len(starts), -1, 3)
            for k, (y, e) in enumerate(zip(xs, res.energy.detach().double().numpy())):
                print(f"  start {k + 1} ({args.offset} Å off): E − E(from initial) {e - energy[0]:+.3f} eV, Dq "
                      f"{dq(y, final.get_positions(), cell, masses):.3f}, symmetric Dq {symmetric_dq(y):.3f}",
                      flush=True)


def _apply(x: np.ndarray, rot: np.ndarray, trans: np.ndarray, perm: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Positions ``x`` moved by one symmetry operation, atoms relabelled so that each lands on its image."""
    y = np.empty_like(x)
    y[perm] = ((x @ np.linalg.inv(cell)) @ rot.T + trans) @ cell
    return y


if __name__ == "__main__":
    main()
