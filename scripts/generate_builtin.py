"""Regenerate the shipped datasets with real DFT (GPAW, the reference level): resumable, run in background.

    OMP_NUM_THREADS=1 python scripts/generate_builtin.py si-defects --jobs 2
    OMP_NUM_THREADS=1 python scripts/generate_builtin.py crystals --jobs 2
"""
import argparse
from pathlib import Path

from relaxtune.data.builders import build_crystals, build_si_defects
from relaxtune.data.generate import GenerateSettings, generate

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "relaxtune" / "data" / "builtin"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", choices=["si-defects", "crystals"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.dataset == "si-defects":
        structures, settings = build_si_defects(), GenerateSettings(calculator="gpaw", fmax=0.02, kpts="gamma")
    else:
        structures, settings = build_crystals(), GenerateSettings(calculator="gpaw", fmax=0.02, relax_cell=True)
    out = args.out or BUILTIN / args.dataset
    generate(structures, out, settings, jobs=args.jobs, on_result=lambda r: print(r, flush=True))


if __name__ == "__main__":
    main()
