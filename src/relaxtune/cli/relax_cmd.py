"""``relaxtune relax``: relax structures from any ASE-readable file with a pretrained or fine-tuned model.

    relaxtune relax structures.extxyz -o relaxed.extxyz --model chgnet --fmax 0.05
    relaxtune relax POSCAR -o relaxed.extxyz --cell --optimizer fire
    relaxtune relax defects.traj -o out.extxyz --model finetuned.pt --batch-size 16 --max-atoms 2000

Up to ``--batch-size`` structures (and ``--max-atoms`` atoms) are relaxed together; as each one finishes, the
next input structure takes its place (``relaxtune.relax.stream``). The output holds one frame per input
structure (in input order): relaxed positions (and cell with --cell), energy, forces (and stress with --cell),
and in the frame's info ``n_steps``, ``converged``, ``fmax`` and ``blew_up`` (next to the input's own info, e.g.
``name``). A structure is appended to OUTPUT (flushed to disk) as soon as it and every structure before it are
relaxed, so an interrupted run keeps every structure it wrote: Ctrl-C exits with code 130 and one line saying how
many structures OUTPUT holds; ``--resume`` continues after them (dropping a last frame cut short by a kill).
"""

from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import typer
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa
from tqdm import tqdm

from relaxtune.atomic import atomic_write_text, durable_append
from relaxtune.potentials.base import UnsupportedElementError
from relaxtune.potentials.checkpoint import unseen_species
from relaxtune.relax import RelaxConfig, relax_stream
from relaxtune.relax.steps import LBFGS_H0
from relaxtune.state import Batch
from relaxtune.data import structures
from relaxtune.cli.common import (CONVENTION, OPTIMIZERS, THREADS_HELP, UserInputError, app, check_writable,
                           default_dtype, deferred_interrupt, file_error, load_model_or_fail, note_on_abort, one_line,
                           use_threads)


def read_structures(path: Path, index: str = ":") -> list:
    """All structures of an ASE-readable file, validated; one-line ``UserInputError`` naming the problem."""
    if not re.fullmatch(r"-?\d+|-?\d*:-?\d*(:-?\d*)?", index.strip()):
        raise UserInputError(f"--index {index}: not an index of frames (':' all, '-1' the last, '0:10' the "
                             "first ten, '::2' every other)")
    try:
        return structures.read_structures(path, index)
    except structures.StructureFileError as exc:
        if exc.__cause__ is not None:  # the reader's own error, in plain words
            raise file_error(str(exc), exc.__cause__) from None
        raise UserInputError(str(exc)) from None


def _load(spec: str, device: str):
    dtype = getattr(torch, default_dtype(spec))
    model = load_model_or_fail(spec, dtype)
    return model.to(device).eval(), dtype


def complete_frames(text: str) -> str:
    """The longest prefix of extxyz ``text`` made of whole frames (a count line, a comment line and that many atom
    lines, each ending in a newline): what survives of a file whose last append was cut short. ``ValueError`` if
    a frame does not begin with its number of atoms (not a truncation: another kind of file)."""
    lines = text.split("\n")[:-1]  # whole lines only: what follows the last newline was cut short
    end = first = 0
    while first < len(lines):
        try:
            n_atoms = int(lines[first])
        except ValueError:
            raise ValueError(f"line {first + 1}: expected the number of atoms of a frame, got "
                             f"{lines[first].strip()[:40]!r}") from None
        last = first + n_atoms + 2
        if last > len(lines):
            break
        end += sum(len(line) + 1 for line in lines[first:last])
        first = last
    return text[:end]


def finished_structures(output: Path, frames: list) -> list:
    """The relaxed structures an earlier run of the same input wrote to ``output`` (``--resume``): they must be
    the first structures of the input, in order, with the same atoms. A last frame cut short (a run killed while
    appending it) is dropped: ``output`` is rewritten atomically to its whole frames."""
    if not output.exists():
        return []
    try:
        text = output.read_text()
        whole = complete_frames(text)
        done = read(io.StringIO(whole), index=":", format="extxyz") if whole else []
    except Exception as exc:
        raise file_error(f"--resume {output}: cannot read the earlier output", exc) from None
    if len(done) > len(frames) or any(
            list(a.numbers) != list(b.numbers) for a, b in zip(done, frames)):
        raise UserInputError(f"--resume {output}: holds structures that are not the first {len(done)} of the input "
                             "(another input or --index?)")
    if len(whole) < len(text):
        atomic_write_text(whole, output)
    return done


def _batch_error(path: Path, offset: int, exc: Exception) -> UserInputError:
    """Map a 'structure k: ...' message from the engine or a model to the file's structure index."""
    msg = one_line(exc)
    match = re.match(r"structure (\d+):\s*(.*)", msg)
    if match:
        return UserInputError(f"{path}: structure {offset + int(match.group(1))}: {match.group(2)}")
    return UserInputError(f"{path}: structures {offset}..: {msg}")


def _append(structures: list, output: Path) -> None:
    """Append ``structures`` to ``output`` (extxyz), flushed and fsynced: a kill loses at most the frame being
    written, which ``finished_structures`` drops."""
    buffer = io.StringIO()
    write(buffer, structures, format="extxyz")
    durable_append(buffer.getvalue(), output)


@app.command("relax", epilog=CONVENTION)
def relax_cmd(
    input: Path = typer.Argument(..., help="Structures: any ASE-readable file (extxyz, traj, CIF, POSCAR, "
                                 "vasprun.xml, ...), one or many frames."),
    output: Path = typer.Option(..., "--output", "-o", help="Output extxyz file (overwritten; each structure is "
                                "appended once it and every structure before it are relaxed, so Ctrl-C keeps "
                                "what is finished)."),
    model: str = typer.Option("chgnet", "--model", "-m", help="chgnet | sevennet | lj | sw | a MACE model file | "
                              "a relaxtune fine-tuned checkpoint (.pt)."),
    optimizer: Literal[OPTIMIZERS] = typer.Option("lbfgs", "--optimizer", help="lbfgs (L-BFGS, each structure "
                                                  "with its own history: about a quarter of FIRE's model calls, see "
                                                  "--lbfgs-h0), fire (ASE's FIRE) or gd (X <- X + eta F, 0.2 Å cap)."),
    lbfgs_h0: Literal[LBFGS_H0] = typer.Option("scaled", "--lbfgs-h0", help="lbfgs: its initial inverse Hessian, "
                                               "scaled from the newest step (about half of ASE's steps) or fixed "
                                               "at 1/70 Å²/eV (ASE's LBFGS, step for step)."),
    fmax: float = typer.Option(0.05, min=1e-6, help="Force convergence, eV/Å."),
    max_steps: int = typer.Option(500, min=0, help="Most optimizer steps per structure."),
    cell: bool = typer.Option(False, "--cell", help="Relax the cell too (FrechetCellFilter-like deformation)."),
    pressure: float = typer.Option(0.0, help="Target pressure with --cell, GPa."),
    batch_size: int = typer.Option(16, min=1, help="Structures relaxed together; as each one finishes, the next "
                                   "input structure takes its place."),
    max_atoms: Optional[int] = typer.Option(None, "--max-atoms", min=1, help="Most atoms relaxed together (a larger "
                                            "structure runs alone). Default: no limit."),
    step_size: Optional[float] = typer.Option(None, min=1e-9, help="gd: eta in Å²/eV (default 0.02); fire: "
                                              "initial time step (default 0.1); not for lbfgs."),
    index: str = typer.Option(":", help="Which frames of INPUT (ASE index: ':' all, '-1' last, '0:10')."),
    device: str = typer.Option("cpu", help="torch device (cpu, cuda)."),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Keep the structures OUTPUT already holds (an interrupted "
                                "run of the same input) and relax the rest."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Relax every structure of INPUT and write the relaxed structures to OUTPUT (extxyz)."""
    check_writable(output, "--output")
    if step_size is not None and optimizer == "lbfgs":
        raise UserInputError("--step-size: sets gd's or fire's step; lbfgs steps by its inverse Hessian (see "
                             "--lbfgs-h0), so give --optimizer fire or gd with it")
    use_threads(threads)
    frames = read_structures(input, index)
    net, dtype = _load(model, device)
    warning = unseen_species(net, frames)
    if warning:
        typer.echo(warning, err=True)
    kwargs = dict(optimizer=optimizer, fmax=fmax, max_steps=max_steps, relax_cell=cell, pressure=pressure * GPa,
                  h0=lbfgs_h0)
    if step_size is not None:
        kwargs[RelaxConfig.step_field(optimizer)] = step_size
    config = RelaxConfig(**kwargs)
    try:
        net.check_supported(Batch.from_atoms(frames, dtype=dtype))
    except UnsupportedElementError as exc:
        raise _batch_error(input, 0, exc) from None

    start = time.perf_counter()
    results = finished_structures(output, frames) if resume else []
    if results:
        typer.echo(f"resuming: {len(results)} of {len(frames)} structures already in {output}", err=True)
    if not resume:
        atomic_write_text("", output)
    bar = tqdm(total=len(frames), initial=len(results), unit="structure", desc=f"relax ({net.name})", leave=False,
               disable=not progress)
    try:
        _relax_in_flight(net, config, frames, results, input, output, batch_size, max_atoms, dtype, device, bar)
    except KeyboardInterrupt:
        note_on_abort(f"{len(results)} of {len(frames)} structures relaxed are in {output}"
                      + ("; --resume relaxes the rest" if results else ""))
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - start
    steps = np.array([a.info["n_steps"] for a in results])
    n_conv = sum(a.info["converged"] for a in results)
    n_blew = sum(a.info["blew_up"] for a in results)
    mean_steps = float(steps.mean()) if len(steps) else math.nan
    blew = f", {n_blew} blew up" if n_blew else ""
    typer.echo(f"relaxed {len(results)} structures with {net.name}: {n_conv} converged (fmax < {fmax} eV/Å){blew}, "
               f"mean steps {mean_steps:.1f}, wall time {wall:.1f} s -> {output}")


def _output_frame(source, result):
    """The output frame of one relaxed structure: its atoms with the input's info, the relaxation's figures in
    the info, and energy, forces (and stress) as a ``SinglePointCalculator``."""
    atoms = result.atoms
    atoms.info.update({key: val for key, val in source.info.items() if key not in ("energy", "stress")})
    atoms.info.update(n_steps=result.n_steps, converged=result.converged, fmax=result.fmax, blew_up=result.blew_up)
    props = dict(energy=result.energy, forces=result.forces)
    if result.stress is not None:
        props["stress"] = full_3x3_to_voigt_6_stress(result.stress)
    atoms.calc = SinglePointCalculator(atoms, **props)
    return atoms


def _next_in_order(waiting: dict, start: int) -> list:
    """Take the structures ``start``, ``start + 1``, ... out of ``waiting`` (input index -> frame) while there."""
    ready = []
    while start + len(ready) in waiting:
        ready.append(waiting.pop(start + len(ready)))
    return ready


def _relax_in_flight(net, config, frames: list, results: list, input: Path, output: Path, batch_size: int,
                     max_atoms: int | None, dtype, device: str, bar) -> None:
    """Relax ``frames`` after the ``results`` already finished, ``batch_size`` in flight; append each finished
    structure to ``output`` and ``results`` as soon as every structure before it in the input is there too."""
    offset = len(results)

    def progress(report):
        bar.set_postfix(step=report.step, in_flight=report.n_structures, refresh=False)

    try:
        stream = relax_stream(net, frames[offset:], config, max_structures=batch_size, max_atoms=max_atoms,
                              dtype=dtype, device=device, progress=progress)
    except (ValueError, UnsupportedElementError) as exc:
        raise _batch_error(input, offset, exc) from None
    waiting: dict = {}
    for index, result in stream:
        waiting[offset + index] = _output_frame(frames[offset + index], result)
        bar.update(1)  # redraws at most every 0.1 s
        ready = _next_in_order(waiting, len(results))
        if ready:
            with deferred_interrupt():  # the file and the count in the 'aborted' line agree
                _append(ready, output)
                results.extend(ready)
