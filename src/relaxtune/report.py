"""A report for one fine-tuning run: markdown + self-contained HTML with matplotlib PNG plots.

Reads what the trainer left in a run directory (``summary.json``, ``metrics.csv``, ``best.pt``, ``last.pt``;
see :mod:`relaxtune.train.finetune`) and adds what the trainer does not record: the pretrained and the
fine-tuned model (``best.pt``, else ``last.pt``) each relax the initial structures of a data split (the test
split by default) with the run's own validation settings (optimizer, ``eval_fmax``, ``eval_max_steps``), which
gives per-structure Dq before/after, per-atom displacements to the DFT-relaxed structures and energy traces.
Those relaxations are cached in ``OUT/report_data.json`` (keyed by checkpoint, data and settings), so a second
``relaxtune report`` is fast.

Any piece may be missing (a run killed before its first checkpoint, no summary, no test data): its section
then says what is missing and how to get it; only a path that is not a run directory at all is an error
(``ReportError``, one line).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RUN_FILES = ("summary.json", "metrics.csv", "best.pt", "last.pt")
REPORT_DATA = "report_data.json"
CACHE_VERSION = 1


class ReportError(ValueError):
    """RUN_DIR is not something a report can be made from (one line, for the CLI)."""


# ---------------------------------------------------------------------------------------------- run contents
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
        return self.best or self.last

    @property
    def config(self) -> dict[str, Any]:
        if self.summary and isinstance(self.summary.get("config"), dict):
            return self.summary["config"]
        if self.checkpoint and isinstance(self.checkpoint.get("config"), dict):
            return self.checkpoint["config"]
        return {}

    @property
    def model_spec(self) -> str | None:
        for src in (self.checkpoint or {}, self.summary or {}):
            if src.get("model_spec"):
                return str(src["model_spec"])
        return self.config.get("model")


def _number(text: str) -> Any:
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
        p = path / f"{name}.pt"
        if p.exists():
            setattr(run, name, p)
    if run.model_path is not None:
        from relaxtune.potentials.checkpoint import read_checkpoint

        try:
            data = read_checkpoint(run.model_path)
            run.checkpoint = {k: v for k, v in data.items() if k not in ("state_dict", "trainer")}
        except ValueError as exc:
            run.notes.append(f"{run.model_path.name} is unreadable: {exc}")
            run.best = run.last = None
    else:
        run.notes.append("neither best.pt nor last.pt exists: no fine-tuned model to compare.")
    return run


# ---------------------------------------------------------------------------------------------- data
def infer_data_spec(run: RunInfo) -> str | None:
    """The dataset the run trained on, when the run records it or its training names all sit in one builtin
    dataset (smallest first, so a view like ``si-defects-mini`` wins over its parent)."""
    for src in (run.summary or {}, (run.summary or {}).get("config") or {}, run.config):
        for key in ("data", "dataset", "data_spec"):
            if isinstance(src.get(key), str) and src[key]:
                return src[key]
    names = set((run.summary or {}).get("train_names") or [])
    if not names:
        return None
    from relaxtune.data.registry import DATASETS

    candidates = []
    for name, ds in DATASETS.items():
        expected = {n for n, _ in ds.expected_structures()}
        if expected and names <= expected:
            candidates.append((len(expected), name))
    return f"builtin:{min(candidates)[1]}" if candidates else None


def select_split(pairs: Sequence, split: str, exclude: set[str]) -> tuple[list, str]:
    """Pairs of ``split`` (by their ``split`` tag); without split tags, the pairs not in ``exclude`` (the
    run's training and validation names). Returns (pairs, how they were chosen)."""
    tagged = [p for p in pairs if getattr(p, "split", None) is not None]
    if tagged:
        chosen = [p for p in pairs if p.split == split]
        return chosen, f"split `{split}`"
    chosen = [p for p in pairs if p.name not in exclude]
    return chosen, "all structures not used for training or validation (the data has no splits)"


# ---------------------------------------------------------------------------------------------- relaxations
def relax_pairs(model, pairs: Sequence, *, fmax: float, optimizer: str, max_steps: int, batch_size: int = 4,
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Relax each pair's initial structure with ``model`` (no graph) and compare with its DFT-relaxed one.

    One dict per pair: dq, rmsd, max_disp, per-atom displacements (Å, minimum image), energy trace (eV per
    optimizer step), steps, converged, blew_up.
    """
    import torch

    from relaxtune.evaluate import model_dtype
    from relaxtune.relax import RelaxConfig, relax
    from relaxtune.state import Batch
    from relaxtune import metrics as distance

    dtype = model_dtype(model)
    config = RelaxConfig(optimizer=optimizer, fmax=fmax, max_steps=max_steps)
    out: list[dict[str, Any]] = []
    for start in range(0, len(pairs), max(1, batch_size)):
        chunk = list(pairs[start:start + max(1, batch_size)])
        if progress:
            progress(f"relaxing {', '.join(p.name for p in chunk)}")
        batch = Batch.from_atoms([p.initial for p in chunk], dtype=dtype)
        reference = torch.tensor(np.concatenate([p.final.get_positions() for p in chunk]), dtype=dtype)
        with torch.no_grad():
            res = relax(model, batch, config, grad_mode="none", record_trace=True)
            final = res.batch
            disp = distance.minimum_image_displacement(final.positions, reference, final.cell, final.pbc,
                                                     final.system_idx).norm(dim=-1)
            dq = distance.dq(final, reference)
            rmsd = distance.rmsd(final, reference)
            mx = distance.max_displacement(final, reference)
        trace = res.energy_trace.detach().double().cpu().numpy() if res.energy_trace is not None else None
        for k, pair in enumerate(chunk):
            sel = (final.system_idx == k).cpu().numpy()
            bad = bool(res.blew_up[k]) or not math.isfinite(float(dq[k]))
            n = int(res.n_steps[k])
            tr = trace[: n + 1, k] if trace is not None else None
            out.append({
                "name": pair.name, "group": pair.group, "n_atoms": len(pair.initial),
                "dq": None if bad else float(dq[k]), "rmsd": None if bad else float(rmsd[k]),
                "max_disp": None if bad else float(mx[k]),
                "displacements": None if bad else [float(x) for x in disp.cpu().numpy()[sel]],
                "energy_trace": None if tr is None or bad else [float(x) for x in tr],
                "energy_dft": pair.energy_final,
                "steps": n, "converged": bool(res.converged[k]) and not bad, "blew_up": bad,
            })
    return out


def _file_key(path: Path | None) -> str:
    if path is None:
        return "none"
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def compare_models(run: RunInfo, pairs: Sequence, *, fmax: float, optimizer: str, max_steps: int,
                   batch_size: int = 4, cache: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Relax ``pairs`` with the pretrained model and the run's fine-tuned model (best.pt, else last.pt).

    Returns {"before": rows, "after": rows or None, "settings": ...}; reuses ``cache`` when its key matches.
    """
    import torch

    settings = {"fmax": fmax, "optimizer": optimizer, "max_steps": max_steps,
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
    from relaxtune.potentials import load_model
    from relaxtune.potentials import load_checkpoint_model

    dtype = {"float64": torch.float64}.get(str((run.checkpoint or {}).get("dtype") or run.config.get("dtype")),
                                           torch.float32)
    before = load_model(run.model_spec, dtype=dtype)
    before.eval()
    result: dict[str, Any] = {"key": key, "settings": settings,
                              "before": relax_pairs(before, pairs, fmax=fmax, optimizer=optimizer,
                                                    max_steps=max_steps, batch_size=batch_size, progress=progress),
                              "after": None}
    del before
    if run.model_path is not None:
        after = load_checkpoint_model(run.model_path)
        result["after"] = relax_pairs(after, pairs, fmax=fmax, optimizer=optimizer, max_steps=max_steps,
                                      batch_size=batch_size, progress=progress)
    if cache is not None:
        from relaxtune.train.checkpoint import atomic_write_text

        atomic_write_text(json.dumps(result) + "\n", cache)
    return result


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _col(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and r.get("epoch") is not None:
            xs.append(int(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_curves(metrics: list[dict], objective: str, path: Path, val_start: str = "initial") -> Path | None:
    """Validation Dq per epoch (epoch 0 = pretrained) and the training loss per epoch."""
    plt = _plt()
    vx, vy = _col(metrics, "val_dq_mean")
    tx, ty = _col(metrics, "train_loss")
    if not vx and not tx:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    ax = axes[0]
    if vx:
        start = "initial" if val_start == "initial" else "DFT-relaxed"
        ax.plot(vx, vy, "o-", color="C1", label=f"validation Dq (from the {start} structures)")
        ax.axhline(vy[0], color="gray", ls=":", lw=1, label="pretrained (epoch 0)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dq (√amu·Å)")
    ax.set_title("validation Dq")
    ax = axes[1]
    label = {"structure": "training Dq (relaxation)", "forces": "training loss (force/energy MSE)"}.get(
        objective, "training loss (Dq + forces_mix x force/energy MSE)")
    if tx:
        ax.plot(tx, ty, "s-", color="C0", label=label)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training epoch yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dq (√amu·Å)" if objective == "structure" else "loss")
    ax.set_title("training")
    last = max(vx + tx)
    for a in axes:
        a.set_xlim(-0.3, last + 0.3)
        a.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def _paired(cmp: dict) -> list[tuple[str, float, float]]:
    after = {r["name"]: r for r in (cmp.get("after") or [])}
    return [(r["name"], r["dq"], after[r["name"]]["dq"]) for r in cmp["before"]
            if r["name"] in after and r["dq"] is not None and after[r["name"]]["dq"] is not None]


def plot_dq_scatter(cmp: dict, path: Path) -> Path | None:
    """Per-structure Dq after vs before with the diagonal (points below it improved)."""
    pts = _paired(cmp)
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    b = np.array([p[1] for p in pts])
    a = np.array([p[2] for p in pts])
    hi = float(max(b.max(), a.max())) * 1.1 or 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="no change")
    ax.scatter(b, a, color="C2", zorder=3)
    for name, x, y in pts:
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("Dq pretrained (√amu·Å)")
    ax.set_ylabel("Dq fine-tuned (√amu·Å)")
    ax.set_title("per-structure Dq (below the line = better)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dq_bars(cmp: dict, path: Path) -> Path | None:
    pts = _paired(cmp)
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(pts) + 2), 3.6))
    x = np.arange(len(pts))
    ax.bar(x - 0.2, [p[1] for p in pts], 0.4, label="pretrained", color="C7")
    ax.bar(x + 0.2, [p[2] for p in pts], 0.4, label="fine-tuned", color="C2")
    ax.set_xticks(x, [p[0] for p in pts], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dq (√amu·Å)")
    ax.set_title("Dq to the DFT-relaxed structure, per structure", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_displacements(cmp: dict, path: Path) -> Path | None:
    """Histogram (log counts) of per-atom distances to the DFT-relaxed positions, before and after."""
    def flat(rows):
        return np.array([d for r in rows or [] if r.get("displacements") for d in r["displacements"]])

    b, a = flat(cmp.get("before")), flat(cmp.get("after"))
    if b.size == 0 and a.size == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    hi = max(b.max() if b.size else 0, a.max() if a.size else 0, 1e-3)
    bins = np.linspace(0, hi * 1.02, 40)
    if b.size:
        ax.hist(b, bins=bins, alpha=0.55, color="C7", label=f"pretrained (mean {b.mean():.4f} Å)")
    if a.size:
        ax.hist(a, bins=bins, alpha=0.55, color="C2", label=f"fine-tuned (mean {a.mean():.4f} Å)")
    ax.set_yscale("log")
    ax.set_xlabel("|x_model − x_DFT| per atom (Å, minimum image)")
    ax.set_ylabel("atoms")
    ax.set_title("per-atom displacement to the DFT-relaxed structure", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_traces(cmp: dict, path: Path, n: int = 3) -> Path | None:
    """Energy (relative to its own start) vs optimizer step for up to ``n`` structures."""
    after = {r["name"]: r for r in (cmp.get("after") or [])}
    chosen = [r for r in cmp["before"] if r.get("energy_trace")][:n]
    if not chosen:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.4 * len(chosen) + 0.6, 3.4), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        t = np.array(r["energy_trace"])
        ax.plot(np.arange(t.size), t - t[0], color="C7", label="pretrained")
        ra = after.get(r["name"])
        if ra and ra.get("energy_trace"):
            ta = np.array(ra["energy_trace"])
            ax.plot(np.arange(ta.size), ta - ta[0], color="C2", label="fine-tuned")
        ax.set_title(r["name"], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("E − E(step 0) (eV)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def movement_items(summary: dict | None) -> list[tuple[str, float]]:
    """(label, relative movement ||θ-θ0||/||θ0||) per parameter group, then per model module."""
    moved = (summary or {}).get("parameter_movement") or {}
    items = []
    for group in ("model", "relax"):
        v = moved.get(group)
        if isinstance(v, dict) and v.get("relative") is not None:
            items.append((f"{group} (all)", float(v["relative"])))
    for name, v in sorted((moved.get("model_by_module") or {}).items()):
        if v is not None:
            items.append((f"model: {name}", float(v)))
    return items


def plot_movement(summary: dict | None, path: Path) -> Path | None:
    items = movement_items(summary)
    if not items:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(items) + 1.4))
    vals = [max(v, 1e-12) for _, v in items]
    colors = ["C3" if lbl.startswith("relax") else ("C0" if lbl.endswith("(all)") else "C9") for lbl, _ in items]
    y = np.arange(len(items))[::-1]
    ax.barh(y, vals, color=colors)
    ax.set_yticks(y, [lbl for lbl, _ in items], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("relative change ||θ − θ₀|| / ||θ₀||")
    ax.set_title("parameter movement per group", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e5:
            return str(int(v))
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out


def _mean(vals: Sequence[float | None]) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def build_markdown(run: RunInfo, cmp: dict | None, plots: dict[str, Path | None], data_note: str) -> str:
    s = run.summary or {}
    cfg = run.config
    lines = [f"# Fine-tuning report: `{run.run_dir.name}`", ""]
    lines += [f"Run directory: `{run.run_dir}`. Model: `{run.model_spec or 'unknown'}`; objective: "
              f"`{cfg.get('objective', 'unknown')}`; fine-tuned model compared: "
              f"`{run.model_path.name if run.model_path else 'none'}`.", ""]
    if run.notes:
        lines += ["**Missing or unreadable pieces:**", ""] + [f"- {n}" for n in run.notes] + [""]

    # headline (from summary.json)
    start = "initial" if cfg.get("val_start", "initial") == "initial" else "DFT-relaxed"
    lines += [f"## Summary (validation from the {start} structures, from summary.json)", ""]
    if s:
        vb, va = s.get("val_before") or {}, s.get("val_after") or {}
        rows = [[k, vb.get(k), va.get(k)] for k in ("dq_mean", "dq_median", "rmsd_mean", "max_disp_mean",
                                                    "basin_match_rate", "converged_rate", "steps_mean")]
        if any(v is not None for r in rows for v in r[1:]):
            lines += _table(["validation metric", "pretrained (epoch 0)",
                             f"fine-tuned (best epoch {_fmt(s.get('best_epoch'))})"], rows)
        else:
            lines += ["The run had no validation set (best.pt = lowest training loss); see the held-out section."]
        lines += [""]
        change = s.get("val_dq_change")
        facts = [("training structures", s.get("n_train")), ("validation structures", s.get("n_val")),
                 ("epochs run", s.get("epochs_run")), ("best epoch", s.get("best_epoch")),
                 ("stopped early", s.get("stopped_early")),
                 ("validation Dq change", f"{change * 100:+.1f}%" if isinstance(change, (int, float)) else None),
                 ("skipped structures / batches", f"{s.get('skipped_structures', 0)} / {s.get('skipped_batches', 0)}"),
                 ("wall time (s)", s.get("time_s"))]
        if "step_size_before" in s:
            facts.append(("learned step size", f"{_fmt(s.get('step_size_before'))} → {_fmt(s.get('step_size_after'))}"))
        lines += _table(["", "value"], [[k, v] for k, v in facts]) + [""]
        if s.get("train_names"):
            lines += [f"Training structures: {', '.join(s['train_names'])}.  "]
        if s.get("val_names"):
            lines += [f"Validation structures: {', '.join(s['val_names'])}."]
        lines += [""]
    else:
        lines += ["No summary.json: the run did not finish, so there are no before/after validation figures.", ""]

    # curves
    lines += ["## Training and validation Dq per epoch", ""]
    if plots.get("curves"):
        lines += [f"![training and validation Dq per epoch]({plots['curves'].name})", ""]
        m = [r for r in (run.metrics or []) if r.get("epoch") is not None]
        lines += _table(["epoch", "train loss", "val Dq mean", "val Dq median", "val basin rate", "time (s)"],
                        [[r.get("epoch"), r.get("train_loss"), r.get("val_dq_mean"), r.get("val_dq_median"),
                          r.get("val_basin_match_rate"), r.get("time_s")] for r in m]) + [""]
    else:
        lines += ["Not available: metrics.csv is missing or has no epoch with a figure.", ""]

    # per-structure
    lines += ["## Held-out structures: pretrained vs fine-tuned", ""]
    if cmp is None:
        lines += [f"Not available: {data_note}", ""]
    else:
        st = cmp["settings"]
        lines += [f"Data: {data_note}. Both models relax each initial structure with {st['optimizer'].upper()} to "
                  f"fmax {st['fmax']} eV/Å (at most {st['max_steps']} steps), as the trainer's validation does; "
                  "distances are to the DFT-relaxed structure (minimum image). Dq in √amu·Å; basin = largest atom "
                  "distance < 0.1 Å.", ""]
        after = {r["name"]: r for r in (cmp.get("after") or [])}
        rows = []
        for r in cmp["before"]:
            a = after.get(r["name"], {})
            change = (a["dq"] - r["dq"]) / r["dq"] if a.get("dq") is not None and r.get("dq") else None
            rows.append([r["name"], r["group"], r["dq"], a.get("dq"),
                         f"{change * 100:+.1f}%" if change is not None else "–",
                         r["max_disp"], a.get("max_disp"), r["steps"], a.get("steps"),
                         f"{_fmt(r['converged'])}/{_fmt(a.get('converged'))}"])
        lines += _table(["structure", "group", "Dq pretrained", "Dq fine-tuned", "change", "max disp pre (Å)",
                         "max disp fine (Å)", "steps pre", "steps fine", "converged pre/fine"], rows)
        bm, am = _mean([r["dq"] for r in cmp["before"]]), _mean([r.get("dq") for r in after.values()])
        if bm is not None:
            ch = f" ({(am - bm) / bm * 100:+.1f}%)" if am is not None and bm else ""
            lines += ["", f"Mean Dq over {len(cmp['before'])} structures: pretrained {_fmt(bm)}, fine-tuned "
                      f"{_fmt(am)}{ch}."]
        if cmp.get("after") is None:
            lines += ["", "No fine-tuned checkpoint: only the pretrained model was relaxed."]
        lines += [""]
        for key, alt in (("scatter", "per-structure Dq, fine-tuned vs pretrained"),
                         ("bars", "per-structure Dq bars"),
                         ("displacements", "distribution of per-atom displacements to DFT"),
                         ("traces", "relaxation energy traces")):
            if plots.get(key):
                if key == "displacements":
                    lines += ["### Distribution of per-atom displacements to DFT", ""]
                if key == "traces":
                    lines += ["### Relaxation energy traces", "",
                              "Energy relative to the starting structure vs optimizer step, for the first structures."]
                lines += [f"![{alt}]({plots[key].name})", ""]

    # retention
    lines += ["## Retention: what the pretrained model did well", ""]
    kept = s.get("retention")
    if kept:
        c = kept["counts"]
        lines += [f"best.pt against the pretrained model on the bulk crystals of {', '.join(kept['species'])} "
                  f"({kept['n_crystals']} DFT-relaxed crystals) and on DFT frames the run did not train on "
                  f"(summary.json `retention`): {c['better']} better, {c['same']} same, {c['worse']} worse, "
                  f"**{'kept' if kept['kept'] else 'not kept'}**. Lattice constants and volume errors in %, "
                  "bulk moduli in GPa, force RMSE in eV/Å, stress RMSE in GPa.", ""]
        rows = []
        for it in kept["items"]:
            pct = 100.0 if ("lattice" in it["item"] or "volume" in it["item"]) else 1.0
            rows.append([it["item"], _fmt(it["pretrained"] * pct), _fmt(it["finetuned"] * pct),
                         f"{100 * it['change_vs_pretrained']:+.2f}%" if it["change_vs_pretrained"] is not None
                         else "n/a", it["verdict"]])
        lines += _table(["item", "pretrained", "fine-tuned", "change", "verdict"], rows) + [""]
    else:
        lines += ["Not available: summary.json has no `retention` (run with --no-retention, or not finished).", ""]

    # movement
    lines += ["## Parameter movement per group", ""]
    items = movement_items(run.summary)
    if items:
        lines += ["Relative change ||θ − θ₀|| / ||θ₀|| of each parameter group between the pretrained and the "
                  "final state (summary.json `parameter_movement`): which part of the system training changed.", ""]
        if plots.get("movement"):
            lines += [f"![parameter movement per group]({plots['movement'].name})", ""]
        moved = s.get("parameter_movement") or {}
        rows = [[g, moved[g].get("n"), moved[g].get("initial_norm"), moved[g].get("absolute"), moved[g].get("relative")]
                for g in ("model", "relax") if isinstance(moved.get(g), dict)]
        lines += _table(["group", "parameters", "||θ₀||", "||θ − θ₀||", "relative"], rows) + [""]
    else:
        lines += ["Not available: summary.json has no `parameter_movement` (run not finished).", ""]

    # settings
    lines += ["## Settings", ""]
    if cfg:
        lines += _table(["setting", "value"], [[f"`{k}`", _fmt(v) if not isinstance(v, str) else v]
                                                for k, v in cfg.items()]) + [""]
        if s.get("parameters"):
            p = s["parameters"]
            lines += [f"Trainable parameters: {p.get('trainable')}, frozen: {p.get('frozen')}.", ""]
    else:
        lines += ["Not available: neither summary.json nor a checkpoint records the settings.", ""]
    lines += ["---", f"Generated by `relaxtune report {run.run_dir}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- HTML
def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return out


def markdown_to_html(md: str, image_dir: Path | None = None, title: str = "relaxtune report") -> str:
    """HTML for the markdown subset :func:`build_markdown` writes (headings, tables, images, lists,
    paragraphs); images found in ``image_dir`` are embedded as data URIs so the file stands alone."""
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"^(#{1,4}) (.*)$", line)
        if m:
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
            continue
        m = re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line.strip())
        if m:
            alt, src = m.group(1), m.group(2)
            p = (image_dir / src) if image_dir is not None else None
            if p is not None and p.is_file():
                src = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>')
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= {"-", ":"} for c in r)]
            t = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
            t += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest]
            body.append("\n".join(t + ["</table>"]))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line.strip() == "---":
            body.append("<hr>")
            i += 1
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||!\[|- |---)", lines[i]):
            para.append(lines[i])
            i += 1
        body.append(f"<p>{_inline(' '.join(para))}</p>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}code{background:#f5f5f5;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------- entry point
@dataclass
class ReportResult:
    markdown: Path
    html: Path
    plots: dict[str, Path]
    comparison: dict | None


def write_report(run_dir: str | Path, out: str | Path | None = None, *, data: str | None = None,
                 split: str = "test", fmax: float | None = None, max_steps: int | None = None,
                 max_structures: int | None = None, traces: int = 3, batch_size: int = 4,
                 progress: Callable[[str], None] | None = None) -> ReportResult:
    """Write ``report.md``, ``report.html`` and the PNG plots for the run in ``run_dir`` into ``out``
    (default: ``run_dir/report``). ``data``: dataset spec for the held-out comparison (default: the one the
    run recorded, or the builtin dataset holding its training structures); ``split``: which split of it.
    ``fmax``/``max_steps`` override the run's validation settings; ``max_structures`` caps the comparison.
    """
    run = load_run(run_dir)
    out_dir = Path(out).expanduser() if out is not None else run.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    plots: dict[str, Path | None] = {}
    plots["curves"] = plot_curves(run.metrics, cfg.get("objective", "structure"), out_dir / "curves.png",
                                  cfg.get("val_start", "initial")) \
        if run.metrics else None

    cmp = None
    spec = data or infer_data_spec(run)
    if spec is None:
        data_note = "no data to compare on: the run does not record its dataset; pass `--data DATA`."
    elif run.model_spec is None:
        data_note = "the base model is unknown (no checkpoint and no config)."
    else:
        from relaxtune.data import load_pairs
        from relaxtune.data.pairs import DataError

        try:
            pairs = load_pairs(spec)
        except DataError as exc:
            pairs, data_note = [], f"could not load `{spec}`: {exc}"
        else:
            s = run.summary or {}
            exclude = set(s.get("train_names") or []) | set(s.get("val_names") or [])
            pairs, how = select_split(pairs, split, exclude)
            if max_structures is not None:
                pairs = pairs[: max(0, int(max_structures))]
            data_note = f"`{spec}`, {how}: {len(pairs)} structures"
            if not pairs:
                data_note = f"`{spec}` has no structures in {how} (yet); pass `--data` / `--split`."
        if pairs:
            try:
                cmp = compare_models(run, pairs, fmax=float(fmax if fmax is not None else cfg.get("eval_fmax", 0.02)),
                                     optimizer=str(cfg.get("eval_optimizer", "fire")),
                                     max_steps=int(max_steps if max_steps is not None else cfg.get("eval_max_steps", 500)),
                                     batch_size=batch_size, cache=out_dir / REPORT_DATA, progress=progress)
            except Exception as exc:  # a model that cannot load or relax these structures: say so, keep going
                cmp, data_note = None, f"relaxing `{spec}` failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    if cmp is not None:
        plots["scatter"] = plot_dq_scatter(cmp, out_dir / "dq_scatter.png")
        plots["bars"] = plot_dq_bars(cmp, out_dir / "dq_bars.png")
        plots["displacements"] = plot_displacements(cmp, out_dir / "displacements.png")
        plots["traces"] = plot_traces(cmp, out_dir / "energy_traces.png", n=traces)
    plots["movement"] = plot_movement(run.summary, out_dir / "movement.png")

    md = build_markdown(run, cmp, plots, data_note)
    md_path = out_dir / "report.md"
    md_path.write_text(md)
    html_path = out_dir / "report.html"
    html_path.write_text(markdown_to_html(md, out_dir, title=f"relaxtune report: {run.run_dir.name}"))
    return ReportResult(markdown=md_path, html=html_path, plots={k: v for k, v in plots.items() if v is not None},
                        comparison=cmp)
