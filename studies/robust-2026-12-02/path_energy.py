"""Energy along DFT's own relaxation path of one structure, DFT against models: each frame's energy relative to
the relaxed frame, and the force on one atom projected on that atom's DFT displacement (for a T-site
interstitial: does the model, like DFT, push it from T to the hexagonal site, and put H lower?).

    python path_energy.py NAME MODEL [MODEL ...] [--atom 64] [--every 4]
"""

from __future__ import annotations

import argparse

import numpy as np

from relaxtune.calculator import RelaxtuneCalculator
from relaxtune.data import load_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="builtin:si-defects")
    parser.add_argument("--atom", type=int, default=64)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    pair = next(p for p in load_pairs(args.data) if p.name == args.name)
    frames = list(pair.trajectory)
    cell = np.asarray(frames[0].cell)

    def offset(k: int) -> np.ndarray:  # the atom's displacement from the first frame, minimum image
        d = frames[k].positions[args.atom] - frames[0].positions[args.atom]
        return d - np.round(d @ np.linalg.inv(cell)) @ cell

    move = offset(len(frames) - 1)
    unit = move / np.linalg.norm(move)
    calcs = {m: RelaxtuneCalculator(m) for m in args.models}
    rows = {m: [] for m in ["DFT", *args.models]}
    picked = [k for k in range(len(frames)) if k % args.every == 0 or k == len(frames) - 1]
    for k in picked:
        for m in rows:
            atoms = frames[k]  # DFT's own energy and forces
            if m != "DFT":
                atoms = frames[k].copy()
                atoms.calc = calcs[m]
            rows[m].append((atoms.get_potential_energy(), float(np.dot(atoms.get_forces()[args.atom], unit))))
    print(f"{args.name}: atom {args.atom} moves {np.linalg.norm(move):.2f} Å in DFT; per frame: s (Å along that "
          "move), then per model E - E(relaxed frame) in eV and F.u in eV/Å")
    print("frame | s | " + " | ".join(rows))
    for i, k in enumerate(picked):
        s = float(np.dot(offset(k), unit))
        cells = [f"{rows[m][i][0] - rows[m][-1][0]:+.3f} / {rows[m][i][1]:+.2f}" for m in rows]
        print(f"{k} | {s:.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
