"""Regenerate the shipped datasets with real DFT (GPAW, the reference level): resumable, run in background.

    OMP_NUM_THREADS=1 python scripts/generate_builtin.py si-defects --jobs 2
    OMP_NUM_THREADS=1 python scripts/generate_builtin.py crystals --jobs 2

Independent processes (two shells, two cluster jobs) share the work without clashing with ``--shard I/N``:
process I takes every N-th structure, starting at the I-th.

    OMP_NUM_THREADS=1 python scripts/generate_builtin.py crystals --jobs 1 --shard 0/2 &
    OMP_NUM_THREADS=1 python scripts/generate_builtin.py crystals --jobs 1 --shard 1/2 &
"""
import argparse
from pathlib import Path

from relaxtune.data.builders import build_crystals, build_si_defects
from relaxtune.dft import GenerateSettings, cell_relax_min_ecut, generate

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "relaxtune" / "data" / "builtin"


def _shard(text: str) -> tuple[int, int]:
    """Parse ``I/N`` (0 <= I < N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard: {text!r} is not I/N") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard: {text!r} needs 0 <= I < N")
    return index, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", choices=["si-defects", "crystals"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: this process takes structures I, I+N, ...")
    args = parser.parse_args()
    index, count = args.shard
    out = args.out or BUILTIN / args.dataset
    if args.dataset == "si-defects":
        structures = build_si_defects()[index::count]
        generate(structures, out, GenerateSettings(calculator="gpaw", fmax=0.02, kpts="gamma"), jobs=args.jobs,
                 on_result=lambda r: print(r, flush=True))
        return
    for structures, settings in crystal_jobs(build_crystals()[index::count]):
        generate(structures, out, settings, jobs=args.jobs, on_result=lambda r: print(r, flush=True))


def crystal_jobs(structures):
    """(structures, settings) groups in input order: the reference 300 eV, or the cell-relaxation cutoff that a
    structure's first-row elements need (B, C, N: ``CELL_RELAX_MIN_ECUT``)."""
    groups = []
    for atoms in structures:
        ecut = max(300.0, cell_relax_min_ecut(atoms)[0])
        if groups and groups[-1][1].ecut == ecut:
            groups[-1][0].append(atoms)
        else:
            groups.append(([atoms], GenerateSettings(calculator="gpaw", fmax=0.02, relax_cell=True, ecut=ecut)))
    return groups


if __name__ == "__main__":
    main()
