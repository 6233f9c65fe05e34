"""A run's history: per-epoch statistics, the rows of ``metrics.csv``, the best epoch, early stopping and the
log line of each epoch."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from relaxtune.train.step_loss import RelaxationCounts

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_n", "train_steps_mean", "train_converged_rate",
                 "skipped_structures", "skipped_batches", "cg_iterations", "implicit_fallback", "cg_truncated",
                 "distill_loss", "replay_loss", "grad_norm_model", "grad_norm_elements", "grad_norm_relax",
                 "val_dq_mean", "val_dq_median", "val_rmsd_mean", "val_max_disp_mean", "val_basin_match_rate",
                 "val_converged_rate", "val_steps_mean", "step_size", "is_best", "time_s"]
VAL_KEYS = ("dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate", "converged_rate",
            "steps_mean")


@dataclass
class EpochStats:
    """What one epoch's optimizer steps add up (a row of ``metrics.csv``)."""

    loss_sum: float = 0.0
    n: int = 0
    relaxations: RelaxationCounts = field(default_factory=RelaxationCounts)
    skipped_structures: int = 0
    skipped_batches: int = 0
    grad_norms: dict[str, list[float]] = field(default_factory=dict)
    keep_losses: dict[str, list[float]] = field(default_factory=dict)  # "distill", "replay": one per step

    def row(self) -> dict[str, Any]:
        r = self.relaxations
        out = {
            "train_loss": self.loss_sum / self.n if self.n else None, "train_n": self.n,
            "train_steps_mean": float(np.mean(r.steps)) if r.steps else None,
            "train_converged_rate": float(np.mean(r.converged)) if r.converged else None,
            "skipped_structures": self.skipped_structures, "skipped_batches": self.skipped_batches,
            "cg_iterations": r.cg_iterations, "implicit_fallback": r.fallback, "cg_truncated": r.truncated,
        }
        for name in ("distill", "replay"):
            values = self.keep_losses.get(name)
            out[f"{name}_loss"] = float(np.mean(values)) if values else None
        for name, norms in self.grad_norms.items():
            out[f"grad_norm_{name}"] = float(np.mean(norms)) if norms else None
        return out


class History:
    """The rows of ``metrics.csv`` (epoch 0: the pretrained model), the best epoch (lowest validation Dq, or
    training loss without a validation set) and the count of epochs without an improvement of ``min_delta``
    (``patience`` of them stop the run)."""

    def __init__(self, validated: bool, min_delta: float, patience: int):
        self.validated = validated
        self.min_delta = min_delta
        self.patience = patience
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.stopped_early = False

    def record(self, epoch: int, stats: EpochStats | None, val: dict | None, *, lr: float,
               step_size: float | None, seconds: float) -> dict[str, Any]:
        """Append the epoch's row (``is_best`` set, the best epoch and early stopping updated); returns it."""
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "time_s": round(seconds, 3)}
        if stats is not None:
            row.update(stats.row())
        if val is not None:
            row.update({f"val_{key}": val.get(key) for key in VAL_KEYS})
            if "dq_by_structure" in val:  # summary.json only (not a metrics.csv column)
                row["val_dq_by_structure"] = val["dq_by_structure"]
        if step_size is not None:
            row["step_size"] = step_size
        score = row.get("val_dq_mean") if self.validated else row.get("train_loss")
        improved = False
        if score is not None and math.isfinite(score):
            best_score = self.best.get("score") if self.best else None
            best_score = math.inf if best_score is None else best_score
            # an improvement at round-off level (a learning rate too small to matter) is not one
            tolerance = max(self.min_delta, 1e-9 * abs(best_score) if math.isfinite(best_score) else 0.0)
            improved = score < best_score - tolerance
        if epoch == 0 and not self.validated:
            improved = self.best is None  # the pretrained model is the first "best" without validation
            score = math.inf if score is None else score
        row["is_best"] = improved
        if improved:
            self.best = {"epoch": epoch, "score": score, "val": val, "train_loss": row.get("train_loss")}
            self.bad_epochs = 0
        elif epoch > 0:
            self.bad_epochs += 1
        if epoch > 0 and self.patience > 0 and self.bad_epochs >= self.patience:
            self.stopped_early = True
        self.rows.append(row)
        return row

    def csv_text(self) -> str:
        """``metrics.csv``: one row per epoch, empty cells where a value does not apply."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
        return buf.getvalue()

    def row_of(self, epoch: int | None) -> dict[str, Any]:
        return next((r for r in self.rows if r["epoch"] == epoch), {})


def epoch_line(row: dict[str, Any], history: History, *, objective: str, relative: bool, val_start: str,
               elapsed: float, epochs: int, n_train: int) -> str:
    """The log line of an epoch: training loss, validation Dq, skips, pace, and ``*`` on a new best."""
    parts = [f"epoch {row['epoch']}"]
    if row.get("train_loss") is not None:
        label = {"structure": "train Dq", "forces": "train E/F loss"}.get(objective, "train loss")
        if relative and objective == "structure":
            label = "train Dq/pretrained"  # the relative loss: 1 = as far from DFT as the pretrained model
        parts.append(f"{label} {row['train_loss']:.4f}")
    if row.get("val_dq_mean") is not None:
        label = "val Dq" if val_start == "initial" else "val Dq (from relaxed)"
        parts.append(f"{label} {row['val_dq_mean']:.4f}")
    if row.get("skipped_structures"):
        parts.append(f"skipped {row['skipped_structures']}")
    # elapsed wall time, structures/s of the epoch and the time left at the mean epoch time so far
    pace = f"[{clock(elapsed)}"
    times = [r["time_s"] for r in history.rows if r["epoch"] > 0]
    if row["epoch"] > 0 and row.get("time_s"):
        left = (epochs - row["epoch"]) * (sum(times) / len(times)) if times else 0.0
        pace += f", {n_train / row['time_s']:.2f} structures/s, ~{clock(left)} left"
    parts.append(pace + "]")
    if row.get("is_best"):
        parts.append("*")
    return "  ".join(parts)


def clock(seconds: float) -> str:
    """Wall time as m:ss (h:mm:ss past an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
