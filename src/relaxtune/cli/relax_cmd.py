"""``relaxtune relax``: relax structures from any ASE-readable file with a pretrained or fine-tuned model.

    relaxtune relax structures.extxyz -o relaxed.extxyz --model chgnet --fmax 0.05
    relaxtune relax POSCAR -o relaxed.extxyz --cell --optimizer fire
    relaxtune relax defects.traj -o out.extxyz --model finetuned.pt --batch-size 16

The output holds one frame per input structure (in input order): relaxed positions (and cell with --cell),
energy, forces (and stress with --cell), and in the frame's info ``n_steps``, ``converged``, ``fmax`` and
``blew_up`` (next to the input's own info, e.g. ``name``). It is rewritten atomically after every batch, so an
interrupted run (Ctrl-C: exit code 130, one line saying how many structures OUTPUT holds) keeps every finished
structure; ``--resume`` continues after them.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Literal, Optional

import typer

from relaxtune.atomic import atomic_write_text
from relaxtune.cli import (CONVENTION, OPTIMIZERS, THREADS_HELP, UserInputError, app, check_writable,
                           deferred_interrupt, file_error, load_model_or_fail, note_on_abort, one_line, use_threads)

CLASSICAL = {"lj", "sw"}


def read_structures(path: Path, index: str = ":") -> list:
    """All structures of an ASE-readable file, validated; one-line ``UserInputError`` naming the problem."""
    import numpy as np
    from ase.io import read

    if not path.exists():
        raise UserInputError(f"{path}: no such file")
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder, not a structure file")
    if not re.fullmatch(r"-?\d+|-?\d*:-?\d*(:-?\d*)?", index.strip()):
        raise UserInputError(f"--index {index}: not an index of frames (':' all, '-1' the last, '0:10' the "
                             "first ten, '::2' every other)")
    try:
        frames = read(str(path), index=index)
    except Exception as exc:  # ASE raises many kinds (UnknownFileTypeError, ValueError, StopIteration, ...)
        raise file_error(f"{path}: cannot read structures", exc) from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise UserInputError(f"{path}: no structures in the file")
    for i, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise UserInputError(f"{path}: structure {i}: no atoms")
        if not np.isfinite(atoms.positions).all():
            atom = int(np.nonzero(~np.isfinite(atoms.positions).all(1))[0][0])
            raise UserInputError(f"{path}: structure {i}: positions: non-finite coordinates (atom {atom})")
        cell = atoms.cell.array
        if not np.isfinite(cell).all():
            raise UserInputError(f"{path}: structure {i}: cell: non-finite lattice vectors")
        if atoms.pbc.any():
            volume = abs(np.linalg.det(cell))
            if volume < 1e-6 * max(1.0, len(atoms)):
                raise UserInputError(f"{path}: structure {i}: cell: singular (volume {volume:.3g} Å^3) for a "
                                     "periodic structure")
    return frames


def _load(spec: str, device: str):
    import torch

    dtype = torch.float64 if spec.lower() in CLASSICAL else torch.float32
    model = load_model_or_fail(spec, dtype)
    return model.to(device).eval(), dtype


def finished_structures(output: Path, frames: list) -> list:
    """The relaxed structures an earlier run of the same input wrote to ``output`` (``--resume``): they must be
    the first structures of the input, in order, with the same atoms."""
    from ase.io import read

    if not output.exists():
        return []
    try:
        done = read(str(output), index=":", format="extxyz")
    except Exception as exc:
        raise file_error(f"--resume {output}: cannot read the earlier output", exc) from None
    if len(done) > len(frames) or any(
            list(a.numbers) != list(b.numbers) for a, b in zip(done, frames)):
        raise UserInputError(f"--resume {output}: holds structures that are not the first {len(done)} of the input "
                             "(another input or --index?)")
    return done


def _batch_error(path: Path, offset: int, exc: Exception) -> UserInputError:
    """Map a 'structure k: ...' message from the engine or a model to the file's structure index."""
    msg = one_line(exc)
    match = re.match(r"structure (\d+):\s*(.*)", msg)
    if match:
        return UserInputError(f"{path}: structure {offset + int(match.group(1))}: {match.group(2)}")
    return UserInputError(f"{path}: structures {offset}..: {msg}")


def _write_atomically(structures: list, output: Path) -> None:
    """All finished structures to ``output`` (extxyz), replacing it in one step."""
    import io

    from ase.io import write


    buffer = io.StringIO()
    write(buffer, structures, format="extxyz")
    atomic_write_text(buffer.getvalue(), output)


@app.command("relax", epilog=CONVENTION)
def relax_cmd(
    input: Path = typer.Argument(..., help="Structures: any ASE-readable file (extxyz, traj, CIF, POSCAR, "
                                 "vasprun.xml, ...), one or many frames."),
    output: Path = typer.Option(..., "--output", "-o", help="Output extxyz file (overwritten; rewritten after "
                                "every batch, so Ctrl-C keeps what is finished)."),
    model: str = typer.Option("chgnet", "--model", "-m", help="chgnet | sevennet | lj | sw | a MACE model file | "
                              "a relaxtune fine-tuned checkpoint (.pt)."),
    optimizer: Literal[OPTIMIZERS] = typer.Option("fire", "--optimizer", help="fire (ASE's FIRE), lbfgs (ASE's "
                                                  "L-BFGS: fewer steps near a minimum) or gd (X <- X + eta F, "
                                                  "0.2 Å cap)."),
    fmax: float = typer.Option(0.05, min=1e-6, help="Force convergence, eV/Å."),
    max_steps: int = typer.Option(500, min=0, help="Most optimizer steps per structure."),
    cell: bool = typer.Option(False, "--cell", help="Relax the cell too (FrechetCellFilter-like deformation)."),
    pressure: float = typer.Option(0.0, help="Target pressure with --cell, GPa."),
    batch_size: int = typer.Option(16, min=1, help="Structures relaxed together in one batch."),
    step_size: Optional[float] = typer.Option(None, min=1e-9, help="gd: eta in Å²/eV (default 0.02); fire: "
                                              "initial time step (default 0.1)."),
    index: str = typer.Option(":", help="Which frames of INPUT (ASE index: ':' all, '-1' last, '0:10')."),
    device: str = typer.Option("cpu", help="torch device (cpu, cuda)."),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Keep the structures OUTPUT already holds (an interrupted "
                                "run of the same input) and relax the rest."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Relax every structure of INPUT and write the relaxed structures to OUTPUT (extxyz)."""
    import numpy as np
    from ase.units import GPa
    from tqdm import tqdm

    from relaxtune.potentials.base import UnsupportedElementError
    from relaxtune.relax import RelaxConfig
    from relaxtune.state import Batch
    from relaxtune.potentials.checkpoint import unseen_species

    check_writable(output, "--output")
    use_threads(threads)
    frames = read_structures(input, index)
    net, dtype = _load(model, device)
    warning = unseen_species(net, frames)
    if warning:
        typer.echo(warning, err=True)
    kwargs = dict(optimizer=optimizer, fmax=fmax, max_steps=max_steps, relax_cell=cell, pressure=pressure * GPa)
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
    bar = tqdm(total=len(frames), initial=len(results), unit="structure", desc=f"relax ({net.name})", leave=False,
               disable=not progress)
    try:
        _relax_batches(net, config, frames, results, input, output, batch_size, dtype, device, bar)
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


def _relax_batches(net, config, frames: list, results: list, input: Path, output: Path, batch_size: int, dtype,
                   device: str, bar) -> None:
    """Relax ``frames`` after the ``results`` already finished, appending to ``results`` and rewriting
    ``output`` after every batch."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    from relaxtune.potentials.base import UnsupportedElementError
    from relaxtune.relax import relax
    from relaxtune.state import Batch

    for offset in range(len(results), len(frames), batch_size):
        chunk = frames[offset: offset + batch_size]
        batch = Batch.from_atoms(chunk, dtype=dtype, device=device)

        def progress(step, done, total, _offset=offset):
            bar.set_postfix(step=step, refresh=False)
            bar.update(_offset + done - bar.n)  # redraws at most every 0.1 s

        try:
            res = relax(net, batch, config, progress=progress)
        except (ValueError, UnsupportedElementError) as exc:
            raise _batch_error(input, offset, exc) from None
        relaxed = res.batch.to_atoms()
        slices = res.batch.system_slices()
        finished = []
        for k, (src, atoms) in enumerate(zip(chunk, relaxed)):
            atoms.info.update({key: val for key, val in src.info.items() if key not in ("energy", "stress")})
            atoms.info.update(n_steps=int(res.n_steps[k]), converged=bool(res.converged[k]),
                              fmax=float(res.fmax[k]), blew_up=bool(res.blew_up[k]))
            props = dict(energy=float(res.energy[k]), forces=res.forces[slices[k]].detach().cpu().double().numpy())
            if res.stress is not None:
                props["stress"] = full_3x3_to_voigt_6_stress(res.stress[k].detach().cpu().double().numpy())
            atoms.calc = SinglePointCalculator(atoms, **props)
            finished.append(atoms)
        with deferred_interrupt():  # the file and the count in the 'aborted' line agree
            _write_atomically(results + finished, output)
            results.extend(finished)
        bar.update(offset + len(chunk) - bar.n)
