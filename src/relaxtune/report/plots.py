"""The report's PNG plots (matplotlib on its file-only Agg backend): training curves, per-structure Dq before/after,
per-atom displacements, energy traces and parameter movement. Each returns its path, or None when there is
nothing to plot.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit imported
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from relaxtune.report.run import movement_items


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _col(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a metrics.csv column, skipping empty and non-finite cells."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and r.get("epoch") is not None:
            xs.append(int(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_curves(metrics: list[dict], objective: str, path: Path, val_start: str = "initial") -> Path | None:
    """Validation Dq per epoch (epoch 0 = pretrained) and the training loss per epoch."""
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
    """(name, Dq pretrained, Dq fine-tuned) of each structure both models relaxed without blowing up."""
    after = {r["name"]: r for r in (cmp.get("after") or [])}
    return [(r["name"], r["dq"], after[r["name"]]["dq"]) for r in cmp["before"]
            if r["name"] in after and r["dq"] is not None and after[r["name"]]["dq"] is not None]


def plot_dq_scatter(cmp: dict, path: Path) -> Path | None:
    """Per-structure Dq after vs before with the diagonal (points below it improved)."""
    pts = _paired(cmp)
    if not pts:
        return None
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
    """Per-structure Dq bars, pretrained next to fine-tuned."""
    pts = _paired(cmp)
    if not pts:
        return None
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


def plot_movement(summary: dict | None, path: Path) -> Path | None:
    """Relative parameter change per group and per model module (log scale)."""
    items = movement_items(summary)
    if not items:
        return None
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
