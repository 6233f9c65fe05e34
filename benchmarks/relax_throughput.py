"""Throughput: relaxtune's batched FIRE and L-BFGS + CHGNet vs ASE's FIRE, BFGS and L-BFGS + CHGNetCalculator.

Relaxes the same structures to the same fmax with every method of ``--methods``, side by side in one run:

* default: defective 64-site Si cells (``relaxtune.data.builders``: every defect type, rattled 0.05 Å), cell fixed;
* ``--cell``: the initial structures of the first ``--count`` small crystals of ``builtin:crystals``, cell free
  (relaxtune ``RelaxConfig(relax_cell=True)``, ASE optimizers on ``ase.filters.FrechetCellFilter``).

relaxtune (``relaxtune-fire``, ``relaxtune-lbfgs``) relaxes all structures in one batch (or ``--batch-size``);
``relaxtune-fire-inflight`` relaxes them with FIRE through ``relaxtune.relax.stream.relax_stream``, ``--in-flight``
(default 4) at a time, each finished structure replaced by the next;
ASE (``ase-fire``, ``ase-bfgs``, ``ase-lbfgs``) one structure at a time with
``chgnet.model.dynamics.CHGNetCalculator`` on the same CHGNet weights. Before timing, one evaluation each way
keeps lazy initialisation out of the first repeat. Every repeat runs every method once, the order alternating
between repeats, and reports per method:

* wall time (s);
* model calls per structure (mean): ASE's counted ``calculate`` calls; relaxtune's evaluations, steps + 1, plus
  the structure evaluations its batched calls actually made (finished structures still in a working batch
  included);
* optimizer steps per structure (mean) and the number of structures converged;
* the largest per-atom position difference (Å) from the ``ase-fire`` result of the same repeat (or the first
  method's if ``ase-fire`` is not run): fractional difference to the nearest image, in the reference cell;
* relaxtune only: time inside the model's energy+forces (``energy_and_forces`` calls, timed in place), the
  overhead wall / that time (graph building, optimizer steps and bookkeeping are the overhead), and each ASE
  method's wall time over relaxtune's (also over the fastest ASE method's), per repeat.

A markdown table of medians over repeats follows, then the goals. Goals (16 Si defects): relaxtune >= 3x faster
than ASE FIRE + CHGNetCalculator and >= 1.5x faster than ASE's fastest optimizer; overhead <= 1.10; relaxtune
L-BFGS model calls per structure <= 0.6x relaxtune FIRE's.

    python benchmarks/relax_throughput.py --count 16 --repeats 3 --json relax_throughput.json

One torch and BLAS thread per process by default (``--threads``; the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from ase import Atoms

IN_FLIGHT = "relaxtune-fire-inflight"
METHODS = ("relaxtune-fire", "relaxtune-lbfgs", IN_FLIGHT, "ase-fire", "ase-bfgs", "ase-lbfgs")
REFERENCE = "ase-fire"
#: median-table columns: header, figure key, format
COLUMNS = (("wall s", "wall_s", ".2f"), ("calls/structure", "calls_per_structure", ".1f"),
           ("steps/structure", "steps_per_structure", ".1f"), ("converged", "converged", "g"),
           ("max \\|dx\\| Å", "max_dx_A", ".4f"), ("model E+F s", "model_ef_s", ".2f"),
           ("overhead", "overhead", ".3f"), ("batched calls", "batched_calls", "g"),
           ("evals/structure", "evals_per_structure", ".1f"))


@dataclass(frozen=True)
class Run:
    """One method's result in one repeat (per-structure lists in input order)."""

    wall_s: float
    steps: list[int]
    calls: list[int]  # model evaluations per structure
    converged: int
    final: list[Atoms]  # relaxed structures
    model_s: float | None = None  # relaxtune: time inside energy_and_forces
    batched_calls: int | None = None  # relaxtune: energy_and_forces calls
    evaluated: int | None = None  # relaxtune: structures evaluated by those calls, summed


def _limit_threads(n: int) -> None:
    """Use ``n`` torch and BLAS threads."""
    import scipy.linalg  # noqa: F401  (load scipy's OpenBLAS before limiting)
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def git_commit() -> str:
    """The short commit of this checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def build_structures(count: int, stdev: float = 0.05) -> list[Atoms]:
    """The first ``count`` 64-site Si defect cells, every defect type in turn, rattled ``stdev`` Å."""
    from relaxtune.data.builders import SI_DEFECT_TYPES, build_si_defects

    seeds = tuple(range(1, 2 + count // len(SI_DEFECT_TYPES)))
    return build_si_defects(seeds=seeds, stdev=stdev)[:count]


def load_crystals(count: int) -> list[Atoms]:
    """The initial structures of the first ``count`` pairs of ``builtin:crystals``."""
    from relaxtune.data import load_pairs

    return [pair.initial.copy() for pair in load_pairs("builtin:crystals")[:count]]


@contextlib.contextmanager
def timed_model_calls() -> Iterator[dict[str, Any]]:
    """Time relaxtune's model energy+forces calls in place; yields running totals (seconds, calls, structures)."""
    import relaxtune.relax.working as working

    totals = {"seconds": 0.0, "calls": 0, "structures": 0}
    original = working.energy_and_forces

    def timed(model, batch, *args, **kwargs):
        t0 = time.perf_counter()
        out = original(model, batch, *args, **kwargs)
        totals["seconds"] += time.perf_counter() - t0
        totals["calls"] += 1
        totals["structures"] += batch.n_systems
        return out

    working.energy_and_forces = timed
    try:
        yield totals
    finally:
        working.energy_and_forces = original


def run_relaxtune(model, structures: list[Atoms], optimizer: str, fmax: float, max_steps: int, batch_size: int,
                  cell: bool) -> Run:
    """Relax ``structures`` with relaxtune in batches of ``batch_size``."""
    import torch

    from relaxtune.relax import RelaxConfig, relax
    from relaxtune.state import Batch

    config = RelaxConfig(optimizer=optimizer, fmax=fmax, max_steps=max_steps, relax_cell=cell)
    with timed_model_calls() as model_time:
        start = time.perf_counter()
        results = [relax(model, Batch.from_atoms(structures[i: i + batch_size], dtype=torch.float32), config)
                   for i in range(0, len(structures), batch_size)]
        wall = time.perf_counter() - start
    steps = [int(n) for res in results for n in res.n_steps]
    return Run(wall_s=wall, steps=steps, calls=[n + 1 for n in steps],
               converged=sum(int(res.converged.sum()) for res in results),
               final=[atoms for res in results for atoms in res.batch.to_atoms()], model_s=model_time["seconds"],
               batched_calls=model_time["calls"], evaluated=model_time["structures"])


def run_relaxtune_in_flight(model, structures: list[Atoms], fmax: float, max_steps: int, in_flight: int,
                            cell: bool) -> Run:
    """Relax ``structures`` with relaxtune's FIRE, ``in_flight`` at a time (``relax_stream``)."""
    import torch

    from relaxtune.relax import RelaxConfig
    from relaxtune.relax.stream import relax_stream

    config = RelaxConfig(fmax=fmax, max_steps=max_steps, relax_cell=cell)
    with timed_model_calls() as model_time:
        start = time.perf_counter()
        results = dict(relax_stream(model, structures, config, max_structures=in_flight, dtype=torch.float32))
        wall = time.perf_counter() - start
    ordered = [results[i] for i in range(len(structures))]
    steps = [r.n_steps for r in ordered]
    return Run(wall_s=wall, steps=steps, calls=[n + 1 for n in steps], converged=sum(r.converged for r in ordered),
               final=[r.atoms for r in ordered], model_s=model_time["seconds"], batched_calls=model_time["calls"],
               evaluated=model_time["structures"])


def ase_calculator(model):
    """CHGNet's ASE calculator on ``model``'s weights; ``calc.n_calls`` counts its ``calculate`` calls."""
    from chgnet.model.dynamics import CHGNetCalculator

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its device
        calc = CHGNetCalculator(model=model.model, use_device="cpu")
    calculate = calc.calculate

    def counted(*args, **kwargs) -> None:
        calc.n_calls += 1
        calculate(*args, **kwargs)

    calc.n_calls = 0
    calc.calculate = counted
    return calc


def run_ase(calc, structures: list[Atoms], optimizer: str, fmax: float, max_steps: int, cell: bool) -> Run:
    """Relax ``structures`` one at a time with ASE's ``optimizer`` (on a FrechetCellFilter with ``cell``)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE, LBFGS

    optimizer_class = {"fire": FIRE, "bfgs": BFGS, "lbfgs": LBFGS}[optimizer]
    steps, calls, final, converged = [], [], [], 0
    start = time.perf_counter()
    for initial in structures:
        atoms = initial.copy()
        calc.reset()
        calc.n_calls = 0
        atoms.calc = calc
        opt = optimizer_class(FrechetCellFilter(atoms) if cell else atoms, logfile=None)
        converged += bool(opt.run(fmax=fmax, steps=max_steps))
        steps.append(opt.nsteps)
        calls.append(calc.n_calls)
        final.append(atoms)
    return Run(wall_s=time.perf_counter() - start, steps=steps, calls=calls, converged=converged, final=final)


def run_method(method: str, model, calc, structures: list[Atoms], args: argparse.Namespace) -> Run:
    """Run one method of ``METHODS`` on all structures."""
    kind, optimizer = method.split("-", 1)
    if method == IN_FLIGHT:
        return run_relaxtune_in_flight(model, structures, args.fmax, args.max_steps, args.in_flight, args.cell)
    if kind == "relaxtune":
        return run_relaxtune(model, structures, optimizer, args.fmax, args.max_steps,
                             args.batch_size or len(structures), args.cell)
    return run_ase(calc, structures, optimizer, args.fmax, args.max_steps, args.cell)


def warm_up(model, calc, atoms: Atoms, cell: bool) -> None:
    """One model evaluation each way, untimed."""
    run_relaxtune(model, [atoms], "fire", 1.0, 0, 1, cell)
    run_ase(calc, [atoms], "fire", 1.0, 0, cell)


def max_position_difference(atoms: Atoms, reference: Atoms) -> float:
    """Largest per-atom distance (Å): fractional difference to the nearest image, in the reference cell."""
    d = atoms.get_scaled_positions(wrap=False) - reference.get_scaled_positions(wrap=False)
    d -= np.round(d)
    return float(np.linalg.norm(d @ reference.cell.array, axis=1).max())


def figures(run: Run, reference: Run, ase_walls: dict[str, float]) -> dict[str, float]:
    """One run's figures; a relaxtune run adds model time, overhead and each ASE method's wall over its own."""
    out = {"wall_s": run.wall_s, "calls_per_structure": float(np.mean(run.calls)),
           "steps_per_structure": float(np.mean(run.steps)), "converged": run.converged,
           "max_dx_A": max(max_position_difference(a, b) for a, b in zip(run.final, reference.final))}
    if run.model_s is None:
        return out
    out.update(model_ef_s=run.model_s, overhead=run.wall_s / run.model_s, batched_calls=run.batched_calls,
               evals_per_structure=run.evaluated / len(run.final))
    out.update({f"{name}_over_this": wall / run.wall_s for name, wall in ase_walls.items()})
    if ase_walls:
        out["fastest_ase_over_this"] = min(ase_walls.values()) / run.wall_s
    return out


def run_repeat(repeat: int, methods: list[str], reference: str, model, calc, structures: list[Atoms],
               args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every method once (reversed order on odd repeats); figures per method, printed as they come."""
    order = methods if repeat % 2 == 0 else methods[::-1]
    runs = {}
    for method in order:
        runs[method] = run_method(method, model, calc, structures, args)
        run = runs[method]
        line = (f"  repeat {repeat + 1} {method}: {run.wall_s:.2f} s, {np.mean(run.calls):.1f} calls and "
                f"{np.mean(run.steps):.1f} steps per structure, {run.converged}/{len(structures)} converged")
        if run.model_s is not None:
            line += (f"; model E+F {run.model_s:.2f} s in {run.batched_calls} batched calls, "
                     f"overhead {run.wall_s / run.model_s:.3f}")
        print(line, flush=True)
    ase_walls = {m: runs[m].wall_s for m in methods if m.startswith("ase-")}
    return {m: figures(runs[m], runs[reference], ase_walls) for m in methods}


def medians(per_repeat: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median over repeats of every figure of every method."""
    return {m: {k: statistics.median(rep[m][k] for rep in per_repeat) for k in figs}
            for m, figs in per_repeat[0].items()}


def markdown_table(med: dict[str, dict[str, float]], ase_methods: list[str]) -> str:
    """The medians as a markdown table, one row per method; '-' where a figure does not apply."""
    columns = list(COLUMNS) + [(f"{m} / this", f"{m}_over_this", ".2f") for m in ase_methods]
    if ase_methods:
        columns.append(("fastest ASE / this", "fastest_ase_over_this", ".2f"))
    rows = ["| method | " + " | ".join(head for head, _, _ in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
    for method, figs in med.items():
        cells = [format(figs[key], fmt) if key in figs else "-" for _, key, fmt in columns]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def goal_lines(med: dict[str, dict[str, float]]) -> list[str]:
    """The goals, each with its median figure and whether it is met."""
    def line(text: str, value: float, goal: str, met: bool) -> str:
        return f"  {text} = {value:.3f} (goal {goal}): {'met' if met else 'NOT met'}"

    lines = []
    for method in (m for m in med if m.startswith("relaxtune-")):
        figs = med[method]
        if "ase-fire_over_this" in figs:
            lines.append(line(f"ase-fire / {method} wall", figs["ase-fire_over_this"], ">= 3",
                              figs["ase-fire_over_this"] >= 3))
        if "fastest_ase_over_this" in figs:
            lines.append(line(f"fastest ASE / {method} wall", figs["fastest_ase_over_this"], ">= 1.5",
                              figs["fastest_ase_over_this"] >= 1.5))
        lines.append(line(f"{method} overhead wall / model E+F", figs["overhead"], "<= 1.10",
                          figs["overhead"] <= 1.10))
    if "relaxtune-fire" in med and "relaxtune-lbfgs" in med:
        ratio = med["relaxtune-lbfgs"]["calls_per_structure"] / med["relaxtune-fire"]["calls_per_structure"]
        lines.append(line("relaxtune L-BFGS / FIRE model calls per structure", ratio, "<= 0.6", ratio <= 0.6))
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and with ``--json`` writes) every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16, help="number of structures (default 16)")
    parser.add_argument("--cell", action="store_true",
                        help="relax small crystals of builtin:crystals with the cell free (default: 64-site Si "
                             "defect cells, cell fixed)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to compare (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (default 3)")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å (default 0.05)")
    parser.add_argument("--max-steps", type=int, default=500, help="optimizer steps per structure (default 500)")
    parser.add_argument("--batch-size", type=int, default=0, help="relaxtune batch size (default: all at once)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help=f"{IN_FLIGHT}: structures relaxed together (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--json", type=str, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    _limit_threads(args.threads)
    warnings.filterwarnings("ignore")

    from relaxtune.potentials.chgnet import CHGNetModel

    methods = list(dict.fromkeys(args.methods))
    reference = REFERENCE if REFERENCE in methods else methods[0]
    ase_methods = [m for m in methods if m.startswith("ase-")]
    structures = load_crystals(args.count) if args.cell else build_structures(args.count)
    sizes = [len(atoms) for atoms in structures]
    what = "crystals of builtin:crystals, cell free" if args.cell else "Si defect cells, cell fixed"
    commit = git_commit()
    print(f"commit {commit}; {len(structures)} {what} ({min(sizes)}-{max(sizes)} atoms), fmax {args.fmax} eV/Å, "
          f"max {args.max_steps} steps, relaxtune batch size {args.batch_size or len(structures)}, "
          f"{args.repeats} repeats, {args.threads} thread(s), pid {os.getpid()}; positions compared with "
          f"{reference}", flush=True)

    model = CHGNetModel()
    calc = ase_calculator(model)
    warm_up(model, calc, structures[0], args.cell)
    per_repeat = [run_repeat(r, methods, reference, model, calc, structures, args) for r in range(args.repeats)]
    med = medians(per_repeat)
    print(f"\nmedians over {args.repeats} repeats (max |dx| vs {reference}; 'X / this': X's wall time over this "
          f"method's, per repeat):\n")
    print(markdown_table(med, ase_methods))
    print("\ngoals (set on the 16 Si defects):")
    print("\n".join(goal_lines(med)))

    result = {"commit": commit, "structures": "builtin:crystals" if args.cell else "si-defects",
              "relax_cell": args.cell, "count": len(structures), "atoms": sizes, "fmax": args.fmax,
              "max_steps": args.max_steps, "batch_size": args.batch_size or len(structures),
              "in_flight": args.in_flight,
              "threads": args.threads, "repeats": args.repeats, "methods": methods, "reference": reference,
              "per_repeat": per_repeat, "medians": med}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
