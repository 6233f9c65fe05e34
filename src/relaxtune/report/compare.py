"""Pretrained vs fine-tuned on held-out structures, measured by ``relaxtune.evaluate.evaluate``.

Both models relax the structures of a data split with the run's own validation settings (optimizer,
``eval_fmax``, ``eval_max_steps``, ``val_start``) exactly as ``relaxtune evaluate`` and the trainer's validation
do (the cell free where the reference relaxed it), with the per-atom displacements and energy traces the
plots need. The result is cached in ``OUT/report_data.json``, keyed by checkpoint, data and settings, so a
second report is fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from relaxtune.atomic import atomic_write_text
from relaxtune.data import DataError, has_splits, load_pairs, pairs_in_split
from relaxtune.evaluate import evaluate
from relaxtune.potentials import load_checkpoint_model, load_model
from relaxtune.potentials.checkpoint import DTYPES
from relaxtune.report.run import RunInfo, infer_data_spec

REPORT_DATA = "report_data.json"
#: bumped when the cached rows change meaning (2: rows from evaluate(): cell free, start, cell errors)
CACHE_VERSION = 2


def select_split(pairs: Sequence, split: str, exclude: set[str]) -> tuple[list, str]:
    """Pairs of ``split`` (by their ``split`` tag); without split tags, the pairs not in ``exclude`` (the
    run's training and validation names). Returns (pairs, how they were chosen)."""
    if has_splits(pairs):
        return pairs_in_split(pairs, split), f"split `{split}`"
    chosen = [p for p in pairs if p.name not in exclude]
    return chosen, "all structures not used for training or validation (the data has no splits)"


def held_out_pairs(run: RunInfo, data: str | None, split: str,
                   max_structures: int | None = None) -> tuple[list, str | None, str]:
    """(pairs, dataset spec, note): the pairs to compare on (``data``, else the run's own dataset; its
    ``split``) and a note for the report on where they came from, or why there are none."""
    spec = data or infer_data_spec(run)
    if spec is None:
        return [], None, "no data to compare on: the run does not record its dataset; pass `--data DATA`."
    if run.model_spec is None:
        return [], spec, "the base model is unknown (no checkpoint and no config)."
    try:
        pairs = load_pairs(spec)
    except DataError as exc:
        return [], spec, f"could not load `{spec}`: {exc}"
    summary = run.summary or {}
    exclude = set(summary.get("train_names") or []) | set(summary.get("val_names") or [])
    pairs, how = select_split(pairs, split, exclude)
    if max_structures is not None:
        pairs = pairs[: max(0, int(max_structures))]
    if not pairs:
        return [], spec, f"`{spec}` has no structures in {how} (yet); pass `--data` / `--split`."
    return pairs, spec, f"`{spec}`, {how}: {len(pairs)} structures"


def _file_key(path: Path | None) -> str:
    if path is None:
        return "none"
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def compare_models(run: RunInfo, pairs: Sequence, *, fmax: float, optimizer: str, max_steps: int,
                   start: str = "initial", batch_size: int = 4, cache: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``pairs`` with the pretrained model and the run's fine-tuned model (best.pt, else last.pt).

    Returns {"before": rows, "after": rows or None, "settings": ...} (rows of ``evaluate(..., details=True)``);
    reuses ``cache`` when its key matches.
    """
    settings = {"fmax": fmax, "optimizer": optimizer, "max_steps": max_steps, "start": start,
                "names": [p.name for p in pairs], "checkpoint": _file_key(run.model_path),
                "model_spec": run.model_spec, "version": CACHE_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if cache is not None and cache.exists():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored
        except ValueError:
            pass

    def rows(model, label: str) -> list[dict[str, Any]]:
        if progress:
            progress(f"relaxing {len(pairs)} structures with the {label} model")
        model.eval()
        return evaluate(model, pairs, fmax=fmax, optimizer=optimizer, max_steps=max_steps, start=start,
                        batch_size=batch_size, details=True).rows

    dtype = DTYPES.get(str((run.checkpoint or {}).get("dtype") or run.config.get("dtype")), torch.float32)
    result: dict[str, Any] = {"key": key, "settings": settings,
                              "before": rows(load_model(run.model_spec, dtype=dtype), "pretrained"), "after": None}
    if run.model_path is not None:
        result["after"] = rows(load_checkpoint_model(run.model_path), f"fine-tuned ({run.model_path.name})")
    if cache is not None:
        atomic_write_text(json.dumps(result) + "\n", cache)
    return result
