"""``relaxtune evaluate``: how close a model's relaxations land to the DFT-relaxed structures.

    relaxtune evaluate builtin:si-defects --model chgnet --split test --json before.json
    relaxtune evaluate builtin:si-defects --model runs/si/best.pt --split test --json after.json

Relaxes every initial structure (FIRE to --fmax, 0.02 eV/Å by default = as tight as the shipped reference)
and prints and writes {"n", "dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate",
"converged_rate", "steps_mean", ...} plus per-structure "rows"; with --symprec also Dq up to a symmetry of
each initial structure (relaxtune.symmetry).

--json is rewritten atomically after every batch: until the run ends it holds the structures finished so far,
their metrics and ``"partial": true`` (with ``"n_total"``), so that an interrupted run (Ctrl-C: exit code 130)
keeps what it measured; the finished file has ``"partial": false``. (Under torchrun, rank 0 writes it once, at
the end.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import torch
import typer
from tqdm import tqdm

from relaxtune.atomic import atomic_write_text
from relaxtune.data import DataError, has_splits, load_pairs, pairs_in_split
from relaxtune.data.pairs import dft_frames
from relaxtune.evaluate import Evaluation, chunks, evaluate, summarize
from relaxtune.potentials.base import UnsupportedElementError
from relaxtune.potentials.checkpoint import base_model_spec, read_checkpoint, unseen_species
from relaxtune.retention import retention, retention_lines
from relaxtune.train import distributed
from relaxtune.cli.common import (CONVENTION, OPTIMIZERS, STARTS, THREADS_HELP, UserInputError, app, check_model,
                           check_writable, default_dtype, deferred_interrupt, file_error, load_model_or_fail,
                           note_on_abort, one_line, use_threads)



@app.command("evaluate", epilog=CONVENTION)
def evaluate_command(
    data: Optional[str] = typer.Argument(None, help="Relaxation pairs: a file, a directory, builtin:NAME, ... "
                                         "(with --retention: optional, its DFT frames are checked too)."),
    model: str = typer.Option(..., "--model", "-m", help="chgnet, sevennet, sw, lj, a MACE file or a relaxtune "
                              "checkpoint."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (train | val | test) of DATA."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="JSON file of the metrics and per-structure rows "
                                             "(rewritten after every batch: Ctrl-C keeps what is finished)."),
    fmax: float = typer.Option(0.02, "--fmax", min=1e-6, help="Relaxation convergence, eV/Å."),
    optimizer: Literal[OPTIMIZERS] = typer.Option("fire", "--optimizer", help="Relaxation optimizer: fire (the "
                                                  "protocol of every held-out figure in docs/results.md), lbfgs "
                                                  "(relax's default: fewer model calls; from a far start it may "
                                                  "reach another minimum than FIRE) or gd."),
    max_steps: int = typer.Option(500, "--max-steps", min=0, help="Relaxation step cap."),
    step_size: Optional[float] = typer.Option(None, "--step-size", min=1e-9, help="gd: η in Å²/eV (default 0.02); "
                                              "fire: initial time step (default 0.1). A run trained with "
                                              "--learn-step has its learned η in summary.json (step_size_after)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Structures relaxed together."),
    start: Literal[STARTS] = typer.Option("initial", "--start", help="Relax from the initial structures, or from "
                                          "the DFT-relaxed ones (how far the model's own minimum lies)."),
    symprec: Optional[float] = typer.Option(None, "--symprec", help="Also report Dq up to a symmetry of each "
                                            "initial structure (spglib tolerance, Å; 0.6 for the shipped Si "
                                            "defects, rattled by 0.05 Å): dq_sym_mean, basin_match_sym_rate."),
    retention: bool = typer.Option(False, "--retention", help="Instead: check a fine-tuned checkpoint against its "
                                   "pretrained model on the bulk crystals of its training elements (equations of "
                                   "state, cell relaxations, DFT frames), as every finetune run does."),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default cpu; under torchrun "
                                         "each rank's own GPU cuda:LOCAL_RANK when CUDA is available)."),
) -> None:
    """Relax every initial structure of DATA with a model and compare with the DFT-relaxed one."""
    if json_path is not None:
        check_writable(json_path, "--json")
    check_model(model)
    if retention:
        use_threads(threads)
        return retention_command(model, data, split, json_path)
    if data is None:
        raise UserInputError("DATA: missing (relaxation pairs to evaluate on)")
    if symprec is not None and not symprec > 0:
        raise UserInputError(f"--symprec {symprec}: must be a positive distance in Å")
    use_threads(threads)
    try:  # under torchrun: the structures are spread over the ranks, rank 0 prints and writes
        ctx = distributed.init_from_env(device)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    try:
        pairs = load_pairs(data)
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise file_error(data, exc) from None
    if split is not None:
        if not has_splits(pairs):
            raise UserInputError(f"--split {split}: {data} has no splits (no splits.json)")
        pairs = pairs_in_split(pairs, split)
        if not pairs:
            raise UserInputError(f"--split {split}: no structures of {data} in that split")
    dtype = getattr(torch, default_dtype(model))
    net = load_model_or_fail(model, dtype)
    warning = unseen_species(net, [p.initial for p in pairs])
    if warning and ctx.is_main:
        typer.echo(warning, err=True)
    settings = dict(fmax=fmax, optimizer=optimizer, max_steps=max_steps, step_size=step_size, batch_size=batch_size,
                    dtype=dtype, start=start, symprec=symprec)
    about = {"data": data, "split": split, "model": model}
    try:
        if ctx.active or ctx.device.type != "cpu":
            net = net.to(ctx.device)
            result = distributed.evaluate_distributed(net, pairs, ctx, progress=progress, **settings)
        else:
            result = evaluate_as_it_goes(net, pairs, settings, json_path, about, progress)
    except UnsupportedElementError as exc:
        raise UserInputError(f"{data}: {exc}") from None
    distributed.shutdown(ctx)
    if not ctx.is_main:
        return
    metrics = dict(result.metrics)
    metrics.update(about)
    keys = ("n", "dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate", "converged_rate",
            "steps_mean", "volume_error_abs_mean", "strain_max_mean", "dq_sym_mean", "basin_match_sym_rate")
    for r in result.rows:
        dq = "blew up" if r["dq"] is None else f"Dq {r['dq']:.4f}  max {r['max_disp']:.4f} Å"
        if r.get("dq_sym") is not None:
            dq += f"  (up to {r['n_symmetry_ops']} operations: Dq {r['dq_sym']:.4f}  max {r['max_disp_sym']:.4f} Å)"
        if r.get("volume_error") is not None:
            dq += f"  dV/V {100 * r['volume_error']:+.2f}%"
        typer.echo(f"  {r['name']:<24} {r['group']:<14} {dq}  steps {r['steps']}"
                   f"{'' if r['converged'] else '  (not converged)'}", err=True)
    typer.echo(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    if json_path is not None:

        atomic_write_text(json.dumps({**metrics, "partial": False, "rows": result.rows}, indent=2) + "\n", json_path)


def evaluate_as_it_goes(net, pairs: list, settings: dict, json_path: Optional[Path], about: dict, progress: bool):
    """``relaxtune.evaluate.evaluate`` one batch at a time (the same batches, so the same numbers), rewriting
    ``json_path`` after each with the rows so far (``"partial": true``). Ctrl-C keeps that file and says so."""
    rows: list = []
    metrics: dict = {}
    bar = tqdm(total=len(pairs), desc="evaluate", unit="structure", leave=False, disable=not progress)
    try:
        for chunk in chunks(list(pairs), settings["batch_size"]):
            part = evaluate(net, chunk, progress=False, **settings)
            with deferred_interrupt():  # the file and the count in the 'aborted' line agree
                rows.extend(part.rows)
                metrics = {**part.metrics, **summarize(rows)}
                if json_path is not None and len(rows) < len(pairs):
                    atomic_write_text(json.dumps({**metrics, **about, "partial": True, "n_total": len(pairs),
                                                  "rows": rows}, indent=2) + "\n", json_path)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        if json_path is not None and rows:
            note_on_abort(f"{len(rows)} of {len(pairs)} structures evaluated are in {json_path} (\"partial\": true)")
        raise
    finally:
        bar.close()
    return Evaluation(metrics=metrics, rows=rows)


def retention_command(model: str, data: Optional[str], split: Optional[str], json_path: Optional[Path]) -> None:
    """``evaluate --retention``: the retention suite of ``relaxtune.retention`` for checkpoint ``model`` against
    the model it was trained from, over its training elements (and DATA's DFT frames, if given)."""
    try:
        base = base_model_spec(model)
    except (ValueError, OSError) as exc:
        raise file_error(f"--model {model}", exc) from None
    if base == model:
        raise UserInputError(f"--model {model}: --retention needs a relaxtune checkpoint (.pt) to compare with the "
                             "model it was fine-tuned from")
    net = load_model_or_fail(model, None)
    pretrained = load_model_or_fail(base, None, option=f"--model {model}: its pretrained model")
    frames = {}
    if data is not None:
        try:
            pairs = load_pairs(data)
        except (DataError, FileNotFoundError, ValueError) as exc:
            raise file_error(data, exc) from None
        if split is not None:
            pairs = pairs_in_split(pairs, split) if has_splits(pairs) else []
        frames[data if split is None else f"{data}:{split}"] = [f for p in pairs for f in dft_frames(p)]
    species = net.train_species or sorted({s for fr in frames.values() for a in fr for s in a.get_chemical_symbols()})
    result = retention(net, pretrained, species, extra_frames=frames, trained_on=_replayed(model))
    for line in retention_lines(result):
        typer.echo(line, err=True)
    typer.echo(json.dumps({"kept": result["kept"], **result["counts"]}, indent=2))
    if json_path is not None:
        atomic_write_text(json.dumps({"model": model, "pretrained": base, **result}, indent=2) + "\n", json_path)


def _replayed(checkpoint: str) -> list:
    """The pairs the run behind ``checkpoint`` replayed (``--replay``), so that the check names the crystals it
    fitted; [] when it replayed nothing or its replay data are no longer where the run found them (said once)."""
    spec = read_checkpoint(checkpoint).get("config", {}).get("replay") or ""
    if not spec:
        return []
    try:
        return load_pairs(spec)
    except (DataError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"note: the run replayed {spec}, which cannot be read now ({one_line(exc)}); the check cannot "
                   "tell which crystals it fitted", err=True)
        return []
