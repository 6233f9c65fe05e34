"""Read what the trainer left in a run directory (``summary.json``, ``metrics.csv``, ``best.pt``, ``last.pt``).

Any piece may be missing or unreadable: ``RunInfo`` then carries a note saying so (shown in the report);
only a path that is not a run directory at all is an error (``ReportError``, one line).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaxtune.data.registry import DATASETS
from relaxtune.potentials.checkpoint import read_checkpoint

RUN_FILES = ("summary.json", "metrics.csv", "best.pt", "last.pt")


class ReportError(ValueError):
    """RUN_DIR is not something a report can be made from (one line, for the CLI)."""


@dataclass
class RunInfo:
    """What a run directory holds; ``notes`` collects what was missing or unreadable (shown in the report)."""

    run_dir: Path
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] | None = None
    best: Path | None = None
    last: Path | None = None
    checkpoint: dict[str, Any] | None = None  # best.pt (else last.pt) without weights
    notes: list[str] = field(default_factory=list)

    @property
    def model_path(self) -> Path | None:
        """The fine-tuned model the report compares: best.pt, else last.pt."""
        return self.best or self.last

    @property
    def config(self) -> dict[str, Any]:
        """The run's training settings (summary.json, else the checkpoint)."""
        if self.summary and isinstance(self.summary.get("config"), dict):
            return self.summary["config"]
        if self.checkpoint and isinstance(self.checkpoint.get("config"), dict):
            return self.checkpoint["config"]
        return {}

    @property
    def model_spec(self) -> str | None:
        """The pretrained model the run started from."""
        for source in (self.checkpoint or {}, self.summary or {}):
            if source.get("model_spec"):
                return str(source["model_spec"])
        return self.config.get("model")


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.csv`` with numbers parsed (empty cells become None)."""
    with open(path, newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def load_run(run_dir: str | Path) -> RunInfo:
    """Read a run directory; ``ReportError`` when it is not a directory or holds none of the run files."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise ReportError(f"{path}: run directory: not found")
    if not path.is_dir():
        raise ReportError(f"{path}: run directory: not a directory (pass the folder `relaxtune finetune --out` wrote)")
    if not any((path / name).exists() for name in RUN_FILES):
        raise ReportError(f"{path}: run directory: holds none of {', '.join(RUN_FILES)} (not a fine-tuning run)")
    run = RunInfo(run_dir=path)
    summary = path / "summary.json"
    if summary.exists():
        try:
            run.summary = json.loads(summary.read_text())
            if not isinstance(run.summary, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            run.summary = None
            run.notes.append(f"summary.json is unreadable ({exc}).")
    else:
        run.notes.append("summary.json is missing: the run has not finished (or was killed); "
                         "`relaxtune finetune --resume` completes it.")
    metrics = path / "metrics.csv"
    if metrics.exists():
        try:
            run.metrics = read_metrics(metrics)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            run.notes.append(f"metrics.csv is unreadable ({exc}).")
    else:
        run.notes.append("metrics.csv is missing: no epoch was recorded.")
    for name in ("best", "last"):
        checkpoint = path / f"{name}.pt"
        if checkpoint.exists():
            setattr(run, name, checkpoint)
    if run.model_path is not None:
        try:
            data = read_checkpoint(run.model_path)
            run.checkpoint = {k: v for k, v in data.items() if k not in ("state_dict", "trainer")}
        except ValueError as exc:
            run.notes.append(f"{run.model_path.name} is unreadable: {exc}")
            run.best = run.last = None
    else:
        run.notes.append("neither best.pt nor last.pt exists: no fine-tuned model to compare.")
    return run


def infer_data_spec(run: RunInfo) -> str | None:
    """The dataset the run trained on, when the run records it or its training names all sit in one builtin
    dataset (smallest first, so a view like ``si-defects-mini`` wins over its parent)."""
    for source in (run.summary or {}, (run.summary or {}).get("config") or {}, run.config):
        for key in ("data", "dataset", "data_spec"):
            if isinstance(source.get(key), str) and source[key]:
                return source[key]
    names = set((run.summary or {}).get("train_names") or [])
    if not names:
        return None
    candidates = []
    for name, dataset in DATASETS.items():
        expected = {n for n, _ in dataset.expected_structures()}
        if expected and names <= expected:
            candidates.append((len(expected), name))
    return f"builtin:{min(candidates)[1]}" if candidates else None


def movement_items(summary: dict | None) -> list[tuple[str, float]]:
    """(label, relative movement ||θ-θ0||/||θ0||) per parameter group, then per model module."""
    moved = (summary or {}).get("parameter_movement") or {}
    items = []
    for group in ("model", "relax"):
        value = moved.get(group)
        if isinstance(value, dict) and value.get("relative") is not None:
            items.append((f"{group} (all)", float(value["relative"])))
    for name, value in sorted((moved.get("model_by_module") or {}).items()):
        if value is not None:
            items.append((f"model: {name}", float(value)))
    return items
