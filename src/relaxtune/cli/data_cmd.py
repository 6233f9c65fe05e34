"""``relaxtune data``: build input structures, generate DFT reference relaxations, inspect datasets.

    relaxtune data build si-defects --out structures.extxyz
    relaxtune data generate structures.extxyz --out refs/ --calculator gpaw --jobs 2 --fmax 0.02
    relaxtune data info refs/            (or builtin:si-defects; --json for a JSON object)
    relaxtune data split refs/ --seed 0  (a group-wise random split, written to refs/splits.json)
    relaxtune data datasheet builtin:si-defects --write
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from ase.io import write
from tqdm import tqdm

from relaxtune.atomic import atomic_write_text
from relaxtune.data import DataError, load_pairs, random_group_split, write_splits
from relaxtune.data.builders import build_crystals, build_si_defects
from relaxtune.data.info import dataset_info, datasheet, format_info, write_datasheet
from relaxtune.data.splits import groups_of
from relaxtune.dft import GenerateError, GenerateSettings, generate, pending, preflight, read_structures
from relaxtune.cli.common import CONVENTION, UserInputError, app, check_writable, path_given_once

data_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="markdown",
                       help="Reference relaxation datasets: build inputs, generate with DFT, inspect, split.")
app.add_typer(data_app, name="data")


def _user_errors(func):
    """Turn data/generation errors into one-line user errors (exit 2)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (DataError, GenerateError) as exc:
            raise UserInputError(str(exc)) from None

    return wrapper


@data_app.command("generate", epilog=CONVENTION)
@_user_errors
def generate_cmd(
    structures: Path = typer.Argument(..., help="Input structures: any ASE-readable file (every frame is one "
                                      "structure; info['name'] names its output file, info['group'] its split group)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (required): one NAME.extxyz trajectory "
                                       "per structure."),
    out_short: Optional[Path] = typer.Option(None, "-o", hidden=True, help="Old spelling of --out."),
    calculator: str = typer.Option("gpaw", help="gpaw | espresso | emt | sw | MODULE:CLASS (an ASE calculator class)."),
    jobs: int = typer.Option(1, min=1, help="Parallel single-threaded workers (one per core)."),
    fmax: float = typer.Option(0.05, min=1e-6, help="Force convergence of the relaxation, eV/Å (shipped data: 0.02)."),
    relax_cell: bool = typer.Option(False, "--relax-cell", help="Relax the cell too (ASE FrechetCellFilter)."),
    max_steps: int = typer.Option(300, min=1, help="Most optimizer steps per structure."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry structures that have a NAME.failed.json."),
    ecut: float = typer.Option(300.0, min=1.0, help="Plane-wave cutoff, eV (gpaw, espresso). 300 suits Si, Ge, Al, P, Ga, As; a cell relaxation with C needs 500, with B or N 700 (a warning says so)."),
    kpts: str = typer.Option("auto", help="auto (Γ for ≥ 32 atoms, else density 3.5 Å, Γ-centred) | gamma | density:X."),
    pseudo_dir: Optional[Path] = typer.Option(None, help="espresso: folder of UPF files (default $ESPRESSO_PSEUDO "
                                              "or /usr/share/espresso/pseudo)."),
    pseudo: List[str] = typer.Option([], help="espresso: EL=FILE to choose a pseudopotential (repeatable)."),
) -> None:
    """Relax every structure with an ASE calculator and write its trajectory (resumable, --jobs workers)."""
    out = path_given_once(out, "--out", out_short, "-o", "the folder to write the trajectories to")
    if not structures.exists():
        raise UserInputError(f"{structures}: file not found")
    atoms_list = read_structures(structures)
    settings = GenerateSettings(calculator=calculator, fmax=fmax, relax_cell=relax_cell, max_steps=max_steps,
                                ecut=ecut, kpts=kpts, pseudo_dir=str(pseudo_dir or ""),
                                pseudopotentials=",".join(pseudo))
    preflight(atoms_list, settings)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending(atoms_list, out, retry_failed)
    skipped = len(atoms_list) - len(todo)
    typer.echo(f"{len(atoms_list)} structures, {skipped} already done or failed before, {len(todo)} to relax "
               f"with {calculator} ({jobs} worker{'s' if jobs > 1 else ''}), writing to {out}")
    start = time.time()
    bar = tqdm(total=len(todo), unit="structure", disable=not todo)

    def report(result: dict) -> None:
        bar.update(1)
        if result["status"] == "failed":
            tqdm.write(f"  {result['name']}: FAILED: {result['reason']}")
        else:
            extra = f", resumed at step {result['resumed_at_step']}" if "resumed_at_step" in result else ""
            tqdm.write(f"  {result['name']}: {result['status'].replace('_', ' ')} in {result['steps']} steps "
                       f"({result['seconds']:.0f} s{extra})")

    results = generate(atoms_list, out, settings, jobs=jobs, retry_failed=retry_failed, on_result=report)
    bar.close()
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("converged", "not_converged", "failed")}
    typer.echo(f"done in {time.time() - start:.0f} s: {counts['converged']} converged, {counts['not_converged']} "
               f"not converged (max steps), {counts['failed']} failed, {skipped} skipped")
    failed_files = sorted(out.glob("*.failed.json"))
    if failed_files:
        typer.echo(f"failed structures in {out} (retry with --retry-failed):")
        for path in failed_files:
            try:
                reason = json.loads(path.read_text()).get("reason", "?")
            except (OSError, json.JSONDecodeError):
                reason = "unreadable failure record"
            typer.echo(f"  {path.name[:-len('.failed.json')]}: {reason}")


@data_app.command("build", epilog=CONVENTION)
@_user_errors
def build_cmd(
    kind: str = typer.Argument(..., help="si-defects | crystals"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output extxyz file of initial structures "
                                          "(required)."),
    out_old: Optional[Path] = typer.Option(None, "--out", hidden=True, help="Old spelling of --output."),
    seed: List[int] = typer.Option([], help="si-defects: rattle seeds (repeatable; default 1 2 3); "
                                   "crystals: the one random seed (default 0)."),
    n_per_prototype: int = typer.Option(8, min=1, help="crystals: strained/rattled copies per prototype."),
) -> None:
    """Build the initial structures of the shipped datasets (input for `relaxtune data generate`)."""
    out = path_given_once(output, "-o/--output", out_old, "--out", "the extxyz file to write")

    if kind == "si-defects":
        atoms = build_si_defects(seeds=tuple(seed) if seed else (1, 2, 3))
    elif kind == "crystals":
        if len(seed) > 1:
            raise UserInputError("--seed: crystals take one seed")
        atoms = build_crystals(n_per_prototype=n_per_prototype, seed=seed[0] if seed else 0)
    else:
        raise UserInputError(f"{kind}: unknown structure set (use si-defects or crystals)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, atoms, format="extxyz")
    groups = sorted({a.info["group"] for a in atoms})
    typer.echo(f"wrote {len(atoms)} structures ({len(groups)} groups) to {out}")


@data_app.command("info", epilog=CONVENTION)
@_user_errors
def info_cmd(
    target: str = typer.Argument(..., help="A file, a folder, INITIAL:FINAL, or builtin:NAME[:SPLIT]."),
    json_path: Optional[str] = typer.Option(None, "--json", metavar="FILE",
                                            help="Also write the facts as one JSON object to FILE ('-': print "
                                                 "it instead of the text)."),
    write_datasheet_: bool = typer.Option(False, "--write-datasheet",
                                          help="Also (re)write the DATASHEET.md of a builtin dataset."),
) -> None:
    """Counts, species, sizes, convergence, settings and splits of a dataset."""
    to_stdout = json_path == "-"
    if json_path is not None and not to_stdout:
        check_writable(Path(json_path), "--json")
    if write_datasheet_ and not target.startswith("builtin:"):
        raise UserInputError(f"{target}: --write-datasheet is for builtin datasets")
    info = dataset_info(target)
    typer.echo(json.dumps(info, indent=1) if to_stdout else format_info(info))
    if json_path is not None and not to_stdout:
        atomic_write_text(json.dumps(info, indent=1) + "\n", Path(json_path))
        typer.echo(f"wrote {json_path}")
    if write_datasheet_:
        path = write_datasheet(target)
        if not to_stdout:
            typer.echo(f"wrote {path}")


@data_app.command("datasheet", epilog=CONVENTION)
@_user_errors
def datasheet_cmd(
    name: str = typer.Argument(..., help="builtin:NAME"),
    write: bool = typer.Option(False, "--write", help="Write DATASHEET.md into the dataset folder."),
) -> None:
    """Print (or write) the markdown datasheet of a shipped dataset, computed from its files."""
    if write:
        typer.echo(f"wrote {write_datasheet(name)}")
    else:
        typer.echo(datasheet(name))


@data_app.command("split", epilog=CONVENTION)
@_user_errors
def split_cmd(
    target: str = typer.Argument(..., help="A dataset (file, folder, ...) whose groups to split."),
    seed: int = typer.Option(0, help="Random seed: same groups + seed + fractions = same split."),
    fractions: str = typer.Option("0.8,0.1,0.1", help="train,val,test fractions of the groups."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Where to write splits.json (default: print it)."),
) -> None:
    """A deterministic group-wise random split (whole groups go to train, val or test)."""
    try:
        fr = [float(x) for x in fractions.split(",")]
    except ValueError:
        raise UserInputError(f"--fractions: {fractions!r} is not three comma-separated numbers") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = load_pairs(target)
    split = random_group_split(pairs, fr, seed=seed)
    groups = groups_of(pairs)
    if len(groups) == len(pairs):
        typer.echo("note: every structure is its own group; set info['group'] to keep related structures "
                   "together", err=True)
    if out is None:
        typer.echo(json.dumps(split, indent=1))
    else:
        typer.echo(f"wrote {write_splits(out, split)}: " + ", ".join(f"{k} {len(v)} groups" for k, v in split.items()))
