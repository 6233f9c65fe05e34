"""Throughput: relaxtune's batched FIRE and L-BFGS vs ASE's FIRE, BFGS and L-BFGS (and TorchSim's FIRE).

Relaxes the same structures to the same fmax with every method of ``--methods``, side by side in one run, on
the same model weights (``--model``):

* ``chgnet`` (default): relaxtune's CHGNet adapter vs ``chgnet.model.dynamics.CHGNetCalculator``;
* ``sevennet``: relaxtune's SevenNet-0 adapter (``relaxtune relax --model sevennet``, checkpoint ``7net-0`` of the
  sevenn wheel) vs ``sevenn.calculator.SevenNetCalculator("7net-0")`` and, for ``torchsim-fire``, TorchSim's
  ``torch_sim.models.sevennet.SevenNetModel`` on a network built from the same checkpoint.

Structures:

* default: defective 64-site Si cells (``relaxtune.data.builders``: every defect type, rattled 0.05 Å), cell fixed;
* ``--cell``: the initial structures of the first ``--count`` small crystals of ``builtin:crystals``, cell free
  (relaxtune ``RelaxConfig(relax_cell=True)``, ASE optimizers on ``ase.filters.FrechetCellFilter``).

relaxtune (``relaxtune-fire``, ``relaxtune-lbfgs``) relaxes all structures in one batch (or ``--batch-size``);
``relaxtune-fire-inflight`` relaxes them with FIRE through ``relaxtune.relax.stream.relax_stream``, ``--in-flight``
(default 4) at a time, each finished structure replaced by the next;
ASE (``ase-fire``, ``ase-bfgs``, ``ase-lbfgs``) one structure at a time with the model's ASE calculator;
``torchsim-fire`` (``--model sevennet`` only, cell fixed: TorchSim 0.3.0 has no CHGNet wrapper) relaxes all
structures in one batch with TorchSim 0.3.0's ASE-flavoured FIRE (``torch_sim.optimizers.fire``, its defaults:
dt 0.1, dt_max 1.0, max_step 0.2 Å, as ASE's FIRE), run as TorchSim's examples do: ``torch_sim.optimize`` with
``generate_force_convergence_fn(fmax)``, ``max_steps`` and an ``InFlightAutoBatcher`` holding every structure
(what ``autobatcher=False`` builds), which checks convergence and drops converged structures every
``--torchsim-steps-between-swaps`` steps (default 5, TorchSim's default), so a structure may take up to that
many - 1 steps past convergence. TorchSim 0.3.0's other position optimizers are not offered: its gradient
descent has a fixed learning rate and its ``vv_fire`` flavour divides forces by masses and has no max step, so
neither runs the same algorithm with comparable defaults; 0.3.0 has no (L-)BFGS. TorchSim is an optional,
benchmark-only dependency (``pip install torch-sim-atomistic==0.3.0``, the last release for Python 3.11),
imported only when a ``torchsim-*`` method runs; its 0.3.0 SevenNet wrapper imports
``sevenn.calculator.torch_script_type``, which sevenn 0.13 no longer defines, so it is set (to
``torch.jit.RecursiveScriptModule``, its old value, used there only for an ``isinstance`` check) before the
import. Before timing, one evaluation each way keeps lazy initialisation out of the first repeat. Every repeat
runs every method once, the order alternating between repeats, and reports per method:

* wall time (s);
* model calls per structure (mean): ASE's counted ``calculate`` calls; relaxtune's evaluations, steps + 1, plus
  the structure evaluations its batched calls actually made (finished structures still in a working batch
  included); TorchSim's model calls that included the structure (counted in its model's ``forward``; its
  steps are those calls - 1);
* optimizer steps per structure (mean) and the number of structures converged;
* the largest per-atom position difference (Å) from the ``ase-fire`` result of the same repeat (or the first
  method's if ``ase-fire`` is not run): fractional difference to the nearest image, in the reference cell;
* relaxtune and TorchSim only: time inside the model's energy+forces (relaxtune's ``energy_and_forces`` calls,
  TorchSim's model ``forward``, timed in place), the overhead wall / that time (graph building, optimizer
  steps and bookkeeping are the overhead), and each ASE and TorchSim method's wall time over this one's (also
  the fastest ASE method's), per repeat.

A markdown table of medians over repeats follows, then the goals. Goals (16 Si defects): relaxtune >= 3x faster
than ASE FIRE + CHGNetCalculator and >= 1.5x faster than ASE's fastest optimizer; overhead <= 1.10; relaxtune
L-BFGS model calls per structure <= 0.6x relaxtune FIRE's.

    python benchmarks/relax_throughput.py --count 16 --repeats 3 --json relax_throughput.json
    python benchmarks/relax_throughput.py --model sevennet --count 8 --repeats 3 \
        --methods relaxtune-lbfgs relaxtune-fire torchsim-fire ase-fire ase-lbfgs --json relax_throughput_sevennet.json

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
TORCHSIM_METHODS = ("torchsim-fire",)
METHODS = ("relaxtune-fire", "relaxtune-lbfgs", IN_FLIGHT, "ase-fire", "ase-bfgs", "ase-lbfgs", *TORCHSIM_METHODS)
MODELS = ("chgnet", "sevennet")
REFERENCE = "ase-fire"
TORCHSIM_PIP = "pip install torch-sim-atomistic==0.3.0"
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
    model_s: float | None = None  # relaxtune / TorchSim: time inside energy_and_forces / the model's forward
    batched_calls: int | None = None  # relaxtune / TorchSim: those calls
    evaluated: int | None = None  # relaxtune / TorchSim: structures evaluated by those calls, summed


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


def ase_calculator(name: str, model):
    """The ASE calculator on the weights of relaxtune's ``model`` (``name`` of ``MODELS``): CHGNet's on
    ``model.model``, SevenNet's on the same ``7net-0`` checkpoint; ``calc.n_calls`` counts its ``calculate``
    calls."""
    if name == "sevennet":
        from sevenn.calculator import SevenNetCalculator

        calc = SevenNetCalculator(model="7net-0", device="cpu")
    else:
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


def import_torch_sim():
    """``torch_sim``, or exit with a one-line message saying how to install it."""
    try:
        import torch_sim
    except ImportError:
        raise SystemExit(f"torchsim-* methods need TorchSim, which is not importable: {TORCHSIM_PIP}") from None
    return torch_sim


def torchsim_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-sim-atomistic")
    except PackageNotFoundError:
        return "unknown"


def torchsim_model():
    """TorchSim's SevenNet wrapper on a network built from the ``7net-0`` checkpoint (as TorchSim's own tests
    build it), float32 on the CPU."""
    import_torch_sim()
    import sevenn.calculator
    import sevenn.util
    import torch

    if not hasattr(sevenn.calculator, "torch_script_type"):
        # TorchSim 0.3.0's wrapper imports this name, gone from sevenn 0.13; it only tests isinstance with it
        sevenn.calculator.torch_script_type = torch.jit.RecursiveScriptModule
    from torch_sim.models.sevennet import SevenNetModel as TorchSimSevenNet

    net = sevenn.util.load_checkpoint("7net-0").build_model()
    net.set_is_batch_data(True)
    return TorchSimSevenNet(model=net, device="cpu", dtype=torch.float32)


@contextlib.contextmanager
def counted_torchsim_calls(ts_model, batcher, n_structures: int) -> Iterator[dict[str, Any]]:
    """Time and count the TorchSim model's ``forward`` calls in place; yields running totals (seconds, calls,
    structures, and per input structure the calls that included it, from the batcher's ``current_idx``, which
    exists from ``load_states`` on: the one call before it, ``optimize``'s initial evaluation, includes all)."""
    totals = {"seconds": 0.0, "calls": 0, "structures": 0, "per_structure": [0] * n_structures}
    forward = ts_model.forward

    def timed(state, *args, **kwargs):
        t0 = time.perf_counter()
        out = forward(state, *args, **kwargs)
        totals["seconds"] += time.perf_counter() - t0
        members = list(getattr(batcher, "current_idx", range(n_structures)))
        if len(members) != state.n_systems:
            raise RuntimeError(f"TorchSim evaluated {state.n_systems} structures, its batcher holds {len(members)}")
        totals["calls"] += 1
        totals["structures"] += state.n_systems
        for i in members:
            totals["per_structure"][i] += 1
        return out

    ts_model.forward = timed
    try:
        yield totals
    finally:
        del ts_model.forward  # back to the class's forward


def run_torchsim(ts_model, structures: list[Atoms], optimizer: str, fmax: float, max_steps: int,
                 steps_between_swaps: int) -> Run:
    """Relax ``structures`` in one batch with TorchSim's ``optimizer`` (``fire``: ASE-flavoured FIRE) through
    ``torch_sim.optimize``, converged to ``fmax``, checked every ``steps_between_swaps`` steps."""
    ts = import_torch_sim()

    flavour = {"fire": "ase_fire"}[optimizer]
    # every structure in one batch: what optimize(autobatcher=False) builds, passed in to read its current_idx
    batcher = ts.InFlightAutoBatcher(ts_model, memory_scales_with="n_atoms",
                                     max_memory_scaler=sum(len(atoms) for atoms in structures) + 1)
    convergence = ts.generate_force_convergence_fn(force_tol=fmax, include_cell_forces=False)
    with counted_torchsim_calls(ts_model, batcher, len(structures)) as totals:
        start = time.perf_counter()
        state = ts.optimize(system=[atoms.copy() for atoms in structures], model=ts_model,
                            optimizer=ts.optimizers.fire, convergence_fn=convergence, autobatcher=batcher,
                            max_steps=max_steps, steps_between_swaps=steps_between_swaps, md_flavor=flavour)
        wall = time.perf_counter() - start
    calls = totals["per_structure"]
    return Run(wall_s=wall, steps=[n - 1 for n in calls], calls=calls, converged=int(convergence(state).sum()),
               final=state.to_atoms(), model_s=totals["seconds"], batched_calls=totals["calls"],
               evaluated=totals["structures"])


def run_method(method: str, model, calc, structures: list[Atoms], args: argparse.Namespace,
               ts_model=None) -> Run:
    """Run one method of ``METHODS`` on all structures."""
    kind, optimizer = method.split("-", 1)
    if kind == "torchsim":
        return run_torchsim(ts_model, structures, optimizer, args.fmax, args.max_steps,
                            args.torchsim_steps_between_swaps)
    if method == IN_FLIGHT:
        return run_relaxtune_in_flight(model, structures, args.fmax, args.max_steps, args.in_flight, args.cell)
    if kind == "relaxtune":
        return run_relaxtune(model, structures, optimizer, args.fmax, args.max_steps,
                             args.batch_size or len(structures), args.cell)
    return run_ase(calc, structures, optimizer, args.fmax, args.max_steps, args.cell)


def warm_up(model, calc, atoms: Atoms, cell: bool, ts_model=None) -> None:
    """One model evaluation each way, untimed."""
    run_relaxtune(model, [atoms], "fire", 1.0, 0, 1, cell)
    run_ase(calc, [atoms], "fire", 1.0, 0, cell)
    if ts_model is not None:
        import torch

        ts = import_torch_sim()
        ts_model(ts.initialize_state([atoms.copy()], torch.device("cpu"), torch.float32))


def max_position_difference(atoms: Atoms, reference: Atoms) -> float:
    """Largest per-atom distance (Å): fractional difference to the nearest image, in the reference cell."""
    d = atoms.get_scaled_positions(wrap=False) - reference.get_scaled_positions(wrap=False)
    d -= np.round(d)
    return float(np.linalg.norm(d @ reference.cell.array, axis=1).max())


def figures(run: Run, reference: Run, walls: dict[str, float]) -> dict[str, float]:
    """One run's figures; a relaxtune or TorchSim run adds model time, overhead and each ASE and TorchSim
    method's wall (``walls``) over its own."""
    out = {"wall_s": run.wall_s, "calls_per_structure": float(np.mean(run.calls)),
           "steps_per_structure": float(np.mean(run.steps)), "converged": run.converged,
           "max_dx_A": max(max_position_difference(a, b) for a, b in zip(run.final, reference.final))}
    if run.model_s is None:
        return out
    out.update(model_ef_s=run.model_s, overhead=run.wall_s / run.model_s, batched_calls=run.batched_calls,
               evals_per_structure=run.evaluated / len(run.final))
    out.update({f"{name}_over_this": wall / run.wall_s for name, wall in walls.items()})
    ase_walls = [wall for name, wall in walls.items() if name.startswith("ase-")]
    if ase_walls:
        out["fastest_ase_over_this"] = min(ase_walls) / run.wall_s
    return out


def run_repeat(repeat: int, methods: list[str], reference: str, model, calc, structures: list[Atoms],
               args: argparse.Namespace, ts_model=None) -> dict[str, dict[str, float]]:
    """Every method once (reversed order on odd repeats); figures per method, printed as they come."""
    order = methods if repeat % 2 == 0 else methods[::-1]
    runs = {}
    for method in order:
        runs[method] = run_method(method, model, calc, structures, args, ts_model)
        run = runs[method]
        line = (f"  repeat {repeat + 1} {method}: {run.wall_s:.2f} s, {np.mean(run.calls):.1f} calls and "
                f"{np.mean(run.steps):.1f} steps per structure, {run.converged}/{len(structures)} converged")
        if run.model_s is not None:
            line += (f"; model E+F {run.model_s:.2f} s in {run.batched_calls} batched calls, "
                     f"overhead {run.wall_s / run.model_s:.3f}")
        print(line, flush=True)
    walls = {m: runs[m].wall_s for m in methods if m.startswith(("ase-", "torchsim-"))}
    return {m: figures(runs[m], runs[reference], walls) for m in methods}


def medians(per_repeat: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median over repeats of every figure of every method."""
    return {m: {k: statistics.median(rep[m][k] for rep in per_repeat) for k in figs}
            for m, figs in per_repeat[0].items()}


def markdown_table(med: dict[str, dict[str, float]], compared: list[str]) -> str:
    """The medians as a markdown table, one row per method; '-' where a figure does not apply. ``compared``:
    the ASE and TorchSim methods whose wall time over each row's is a column."""
    columns = list(COLUMNS) + [(f"{m} / this", f"{m}_over_this", ".2f") for m in compared]
    if any(m.startswith("ase-") for m in compared):
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
    parser.add_argument("--model", choices=MODELS, default="chgnet",
                        help="relaxtune model and ASE calculator on the same weights (default chgnet)")
    parser.add_argument("--count", type=int, default=16, help="number of structures (default 16)")
    parser.add_argument("--cell", action="store_true",
                        help="relax small crystals of builtin:crystals with the cell free (default: 64-site Si "
                             "defect cells, cell fixed)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="methods to compare (default: all the model supports; torchsim-* need --model "
                             "sevennet)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (default 3)")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å (default 0.05)")
    parser.add_argument("--max-steps", type=int, default=500, help="optimizer steps per structure (default 500)")
    parser.add_argument("--batch-size", type=int, default=0, help="relaxtune batch size (default: all at once)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help=f"{IN_FLIGHT}: structures relaxed together (default 4)")
    parser.add_argument("--torchsim-steps-between-swaps", type=int, default=5,
                        help="torchsim-*: steps between convergence checks (default 5, TorchSim's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--json", type=str, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in METHODS if args.model == "sevennet" or m not in TORCHSIM_METHODS]
    methods = list(dict.fromkeys(args.methods))
    torchsim_methods = [m for m in methods if m in TORCHSIM_METHODS]
    if torchsim_methods and args.model != "sevennet":
        parser.error(f"{', '.join(torchsim_methods)}: --model sevennet only "
                     "(TorchSim 0.3.0 has no CHGNet wrapper)")
    if torchsim_methods and args.cell:
        parser.error(f"{', '.join(torchsim_methods)}: positions only, no --cell")
    if torchsim_methods:
        import_torch_sim()  # fail now, not after the other methods' repeats
    _limit_threads(args.threads)
    warnings.filterwarnings("ignore")

    from relaxtune.potentials import load_model

    reference = REFERENCE if REFERENCE in methods else methods[0]
    ase_methods = [m for m in methods if m.startswith("ase-")]
    compared = ase_methods + torchsim_methods
    structures = load_crystals(args.count) if args.cell else build_structures(args.count)
    sizes = [len(atoms) for atoms in structures]
    what = "crystals of builtin:crystals, cell free" if args.cell else "Si defect cells, cell fixed"
    commit = git_commit()
    print(f"commit {commit}; model {args.model}; {len(structures)} {what} ({min(sizes)}-{max(sizes)} atoms), "
          f"fmax {args.fmax} eV/Å, "
          f"max {args.max_steps} steps, relaxtune batch size {args.batch_size or len(structures)}, "
          f"{args.repeats} repeats, {args.threads} thread(s), pid {os.getpid()}; positions compared with "
          f"{reference}" + (f"; torch-sim-atomistic {torchsim_version()}, all structures in one batch, "
                            f"convergence checked every {args.torchsim_steps_between_swaps} steps"
                            if torchsim_methods else ""), flush=True)

    model = load_model(args.model)  # as ``relaxtune relax --model``
    calc = ase_calculator(args.model, model)
    ts_model = torchsim_model() if torchsim_methods else None
    warm_up(model, calc, structures[0], args.cell, ts_model)
    per_repeat = [run_repeat(r, methods, reference, model, calc, structures, args, ts_model)
                  for r in range(args.repeats)]
    med = medians(per_repeat)
    print(f"\nmedians over {args.repeats} repeats (max |dx| vs {reference}; 'X / this': X's wall time over this "
          f"method's, per repeat):\n")
    print(markdown_table(med, compared))
    print("\ngoals (set on the 16 Si defects" + ("" if args.model == "chgnet" else " with CHGNet") + "):")
    print("\n".join(goal_lines(med)))

    result = {"commit": commit, "model": args.model, "structures": "builtin:crystals" if args.cell else "si-defects",
              "relax_cell": args.cell, "count": len(structures), "atoms": sizes, "fmax": args.fmax,
              "max_steps": args.max_steps, "batch_size": args.batch_size or len(structures),
              "in_flight": args.in_flight,
              "threads": args.threads, "repeats": args.repeats, "methods": methods, "reference": reference,
              "per_repeat": per_repeat, "medians": med}
    if torchsim_methods:
        result.update(torch_sim=torchsim_version(),
                      torchsim_steps_between_swaps=args.torchsim_steps_between_swaps)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
