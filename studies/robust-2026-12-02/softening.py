"""How soft a model is against DFT: the relaxation energy E(initial) - E(relaxed) it gives on DFT's own two
frames, divided by DFT's, for every shipped Si-defect relaxation (1 = as stiff as DFT; universal MLIPs are known
to come out lower).

    python softening.py MODEL [MODEL ...] [--json FILE]     # MODEL: chgnet, a checkpoint, ...
"""

from __future__ import annotations

import argparse
import json
import statistics

from relaxtune.calculator import RelaxtuneCalculator
from relaxtune.data import load_pairs


def relaxation_energy(calc: RelaxtuneCalculator, initial, final) -> float:
    energies = []
    for frame in (initial, final):
        atoms = frame.copy()
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
    return energies[0] - energies[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="builtin:si-defects")
    parser.add_argument("--json")
    args = parser.parse_args()
    pairs = load_pairs(args.data)
    out = {}
    for model in args.models:
        calc = RelaxtuneCalculator(model)
        ratios = {}
        for pair in pairs:
            dft = pair.initial.get_potential_energy() - pair.final.get_potential_energy()
            ratios[pair.name] = relaxation_energy(calc, pair.initial, pair.final) / dft
        out[model] = {"median": statistics.median(ratios.values()), "ratios": ratios}
        print(f"{model}: median ratio {out[model]['median']:.3f} over {len(ratios)} structures "
              f"(min {min(ratios.values()):.2f} {min(ratios, key=ratios.get)}, "
              f"max {max(ratios.values()):.2f} {max(ratios, key=ratios.get)})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
