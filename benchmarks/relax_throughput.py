"""Throughput: relaxtune batched FIRE + CHGNet vs ASE FIRE + CHGNetCalculator one structure at a time.

Relaxes the same defective 64-site Si cells (``relaxtune.data.builders``: every defect type, rattled 0.05 Å)
to the same fmax both ways and prints, as medians over ``--repeats``:

* wall time of relaxtune (one batch of all structures) and of the ASE loop, and their ratio (goal >= 3);
* relaxtune's overhead over the bare model cost: wall / total time spent in model energy+forces inside the
  run (``energy_and_forces`` calls, timed in place; goal <= 1.15). Graph building (``prepare``), optimizer
  steps and bookkeeping are the overhead;
* agreement: steps per structure both ways and the largest position difference (Å).

    python benchmarks/relax_throughput.py --count 16 --repeats 3

One torch and BLAS thread per process by default (the machine is shared; see DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _limit_threads(n: int) -> None:
    import scipy.linalg  # noqa: F401  (load scipy's OpenBLAS before limiting)
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def build_structures(count: int, stdev: float = 0.05):
    from relaxtune.data.builders import SI_DEFECT_TYPES, build_si_defects

    seeds = tuple(range(1, 2 + count // len(SI_DEFECT_TYPES)))
    return build_si_defects(seeds=seeds, stdev=stdev)[:count]


def run_relaxtune(model, structures, fmax: float, max_steps: int, batch_size: int):
    """Wall time, model E+F time, and the result (positions per structure, steps)."""
    import torch

    import relaxtune.relax.loop as loop
    from relaxtune.relax import RelaxConfig, relax
    from relaxtune.state import Batch

    timed = {"ef": 0.0, "calls": 0}
    original = loop.energy_and_forces

    def timed_energy_and_forces(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        timed["ef"] += time.perf_counter() - t0
        timed["calls"] += 1
        return out

    loop.energy_and_forces = timed_energy_and_forces
    try:
        start = time.perf_counter()
        positions, steps = [], []
        for i in range(0, len(structures), batch_size):
            batch = Batch.from_atoms(structures[i: i + batch_size], dtype=torch.float32)
            res = relax(model, batch, RelaxConfig(fmax=fmax, max_steps=max_steps))
            for k, sl in enumerate(res.batch.system_slices()):
                positions.append(res.batch.positions[sl].double().numpy())
            steps.extend(res.n_steps.tolist())
            assert bool(res.converged.all()), "relaxtune: not all structures converged"
        wall = time.perf_counter() - start
    finally:
        loop.energy_and_forces = original
    return wall, timed["ef"], timed["calls"], positions, steps


def run_ase(model, structures, fmax: float, max_steps: int):
    from ase.optimize import FIRE
    from chgnet.model.dynamics import CHGNetCalculator

    calc = CHGNetCalculator(model=model.model, use_device="cpu")
    start = time.perf_counter()
    positions, steps = [], []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)
        assert opt.run(fmax=fmax, steps=max_steps), "ASE: a structure did not converge"
        positions.append(atoms.positions.copy())
        steps.append(opt.nsteps)
    return time.perf_counter() - start, positions, steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16, help="number of 64-site Si defect cells (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (default 3)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=0, help="relaxtune batch size (default: all at once)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--skip-ase", action="store_true", help="time relaxtune only")
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    _limit_threads(args.threads)

    import contextlib
    import io
    import warnings

    import numpy as np

    from relaxtune.potentials.chgnet import CHGNetModel

    warnings.filterwarnings("ignore")
    structures = build_structures(args.count)
    model = CHGNetModel()
    batch_size = args.batch_size or len(structures)
    print(f"{len(structures)} Si defect cells ({len(structures[0])}±1 atoms), fmax {args.fmax} eV/Å, "
          f"batch size {batch_size}, {args.repeats} repeats, {args.threads} thread(s), pid {os.getpid()}", flush=True)

    ours, ase = [], []
    for r in range(args.repeats):
        wall, ef, calls, pos_rt, steps_rt = run_relaxtune(model, structures, args.fmax, args.max_steps, batch_size)
        ours.append((wall, ef))
        print(f"  repeat {r + 1}: relaxtune {wall:.1f} s (model E+F {ef:.1f} s in {calls} batched calls, "
              f"overhead {wall / ef:.3f})", flush=True)
        if not args.skip_ase:
            with contextlib.redirect_stdout(io.StringIO()):
                wall_ase, pos_ase, steps_ase = run_ase(model, structures, args.fmax, args.max_steps)
            ase.append(wall_ase)
            dev = max(float(np.linalg.norm(a - b, axis=1).max()) for a, b in zip(pos_rt, pos_ase))
            print(f"  repeat {r + 1}: ASE loop {wall_ase:.1f} s; ratio {wall_ase / wall:.2f}; steps relaxtune "
                  f"{np.mean(steps_rt):.1f} vs ASE {np.mean(steps_ase):.1f}; max |dx| {dev:.4f} Å", flush=True)

    figures = {
        "count": len(structures), "repeats": args.repeats, "fmax": args.fmax, "batch_size": batch_size,
        "threads": args.threads,
        "relaxtune_wall_s": statistics.median(w for w, _ in ours),
        "model_ef_s": statistics.median(e for _, e in ours),
        "overhead": statistics.median(w / e for w, e in ours),
        "mean_steps_relaxtune": float(np.mean(steps_rt)),
    }
    if ase:
        figures.update(ase_wall_s=statistics.median(ase), mean_steps_ase=float(np.mean(steps_ase)),
                       max_position_difference_A=dev)
        figures["speedup"] = figures["ase_wall_s"] / figures["relaxtune_wall_s"]
    print("median over repeats:")
    print(f"  relaxtune batched FIRE + CHGNet: {figures['relaxtune_wall_s']:.1f} s "
          f"(model E+F {figures['model_ef_s']:.1f} s), overhead wall/(E+F) = {figures['overhead']:.3f} "
          f"(goal <= 1.15)")
    if ase:
        print(f"  ASE FIRE + CHGNetCalculator, one by one: {figures['ase_wall_s']:.1f} s")
        print(f"  speedup ASE / relaxtune = {figures['speedup']:.2f}x (goal >= 3)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
