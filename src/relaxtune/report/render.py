"""The report as markdown (one section per piece of the run) and as a self-contained HTML page.

HTML comes from markdown-it-py (CommonMark with tables, raw HTML off so names and messages are escaped); the
PNGs the markdown links are embedded as base64 data URIs, so ``report.html`` stands alone.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

from markdown_it import MarkdownIt

from relaxtune.evaluate import finite_mean
from relaxtune.markdown import markdown_table
from relaxtune.report.run import RunInfo, movement_items

STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
         "img{max-width:100%}code{background:#f5f5f5;padding:0 3px}")


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: – for None, yes/no for booleans, integers plain, floats to ``digits``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e5:
            return str(int(value))
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return markdown_table(header, rows, format_value)


def _percent(change: float | None, digits: int = 1) -> str:
    return f"{change * 100:+.{digits}f}%" if change is not None else "–"


# ---------------------------------------------------------------------------------------------- sections
def _header(run: RunInfo) -> list[str]:
    cfg = run.config
    lines = [f"# Fine-tuning report: `{run.run_dir.name}`", ""]
    lines += [f"Run directory: `{run.run_dir}`. Model: `{run.model_spec or 'unknown'}`; objective: "
              f"`{cfg.get('objective', 'unknown')}`; fine-tuned model compared: "
              f"`{run.model_path.name if run.model_path else 'none'}`.", ""]
    if run.notes:
        lines += ["**Missing or unreadable pieces:**", ""] + [f"- {n}" for n in run.notes] + [""]
    return lines


def _summary_section(run: RunInfo) -> list[str]:
    """The trainer's own before/after validation figures (summary.json)."""
    s = run.summary or {}
    start = "initial" if run.config.get("val_start", "initial") == "initial" else "DFT-relaxed"
    lines = [f"## Summary (validation from the {start} structures, from summary.json)", ""]
    if not s:
        return lines + ["No summary.json: the run did not finish, so there are no before/after validation figures.",
                        ""]
    before, after = s.get("val_before") or {}, s.get("val_after") or {}
    rows = [[k, before.get(k), after.get(k)] for k in ("dq_mean", "dq_median", "rmsd_mean", "max_disp_mean",
                                                      "basin_match_rate", "converged_rate", "steps_mean")]
    if any(v is not None for r in rows for v in r[1:]):
        lines += _table(["validation metric", "pretrained (epoch 0)",
                         f"fine-tuned (best epoch {format_value(s.get('best_epoch'))})"], rows)
    else:
        lines += ["The run had no validation set (best.pt = lowest training loss); see the held-out section."]
    lines += [""]
    change = s.get("val_dq_change")
    facts = [("training structures", s.get("n_train")), ("validation structures", s.get("n_val")),
             ("epochs run", s.get("epochs_run")), ("best epoch", s.get("best_epoch")),
             ("stopped early", s.get("stopped_early")),
             ("validation Dq change", _percent(change) if isinstance(change, (int, float)) else None),
             ("skipped structures / batches", f"{s.get('skipped_structures', 0)} / {s.get('skipped_batches', 0)}"),
             ("wall time (s)", s.get("time_s"))]
    if "step_size_before" in s:
        facts.append(("learned step size",
                      f"{format_value(s.get('step_size_before'))} → {format_value(s.get('step_size_after'))}"))
    lines += _table(["", "value"], [[k, v] for k, v in facts]) + [""]
    if s.get("train_names"):
        lines += [f"Training structures: {', '.join(s['train_names'])}.  "]
    if s.get("val_names"):
        lines += [f"Validation structures: {', '.join(s['val_names'])}."]
    return lines + [""]


def _curves_section(run: RunInfo, plots: dict[str, Path | None]) -> list[str]:
    lines = ["## Training and validation Dq per epoch", ""]
    if not plots.get("curves"):
        return lines + ["Not available: metrics.csv is missing or has no epoch with a figure.", ""]
    lines += [f"![training and validation Dq per epoch]({plots['curves'].name})", ""]
    epochs = [r for r in (run.metrics or []) if r.get("epoch") is not None]
    lines += _table(["epoch", "train loss", "val Dq mean", "val Dq median", "val basin rate", "time (s)"],
                    [[r.get("epoch"), r.get("train_loss"), r.get("val_dq_mean"), r.get("val_dq_median"),
                      r.get("val_basin_match_rate"), r.get("time_s")] for r in epochs])
    return lines + [""]


def _held_out_section(cmp: dict | None, plots: dict[str, Path | None], data_note: str) -> list[str]:
    """Pretrained vs fine-tuned, structure by structure (the rows of ``compare_models``)."""
    lines = ["## Held-out structures: pretrained vs fine-tuned", ""]
    if cmp is None:
        return lines + [f"Not available: {data_note}", ""]
    st = cmp["settings"]
    start = "initial" if st.get("start", "initial") == "initial" else "DFT-relaxed"
    lines += [f"Data: {data_note}. Both models relax each {start} structure with {st['optimizer'].upper()} to "
              f"fmax {st['fmax']} eV/Å (at most {st['max_steps']} steps), the cell free where the reference "
              "relaxed it, as `relaxtune evaluate` and the trainer's validation do; distances are to the "
              "DFT-relaxed structure (minimum image; with a free cell: the fractional coordinates placed in the "
              "DFT cell). Dq in √amu·Å; basin = largest atom distance < 0.1 Å.", ""]
    after = {r["name"]: r for r in (cmp.get("after") or [])}
    with_cell = any("volume_error" in r for r in cmp["before"])
    rows = []
    for r in cmp["before"]:
        a = after.get(r["name"], {})
        change = (a["dq"] - r["dq"]) / r["dq"] if a.get("dq") is not None and r.get("dq") else None
        row = [r["name"], r["group"], r["dq"], a.get("dq"), _percent(change), r["max_disp"], a.get("max_disp"),
               r["steps"], a.get("steps"), f"{format_value(r['converged'])}/{format_value(a.get('converged'))}"]
        if with_cell:
            row += [_percent(r.get("volume_error"), 2), _percent(a.get("volume_error"), 2)]
        rows.append(row)
    header = ["structure", "group", "Dq pretrained", "Dq fine-tuned", "change", "max disp pre (Å)",
              "max disp fine (Å)", "steps pre", "steps fine", "converged pre/fine"]
    lines += _table(header + (["ΔV/V pre", "ΔV/V fine"] if with_cell else []), rows)
    mean_before = finite_mean([r["dq"] for r in cmp["before"]])
    mean_after = finite_mean([r.get("dq") for r in after.values()])
    if mean_before is not None:
        change = (f" ({_percent((mean_after - mean_before) / mean_before)})"
                  if mean_after is not None and mean_before else "")
        lines += ["", f"Mean Dq over {len(cmp['before'])} structures: pretrained {format_value(mean_before)}, "
                  f"fine-tuned {format_value(mean_after)}{change}."]
    if cmp.get("after") is None:
        lines += ["", "No fine-tuned checkpoint: only the pretrained model was relaxed."]
    lines += [""]
    for key, alt in (("scatter", "per-structure Dq, fine-tuned vs pretrained"),
                     ("bars", "per-structure Dq bars"),
                     ("displacements", "distribution of per-atom displacements to DFT"),
                     ("traces", "relaxation energy traces")):
        if not plots.get(key):
            continue
        if key == "displacements":
            lines += ["### Distribution of per-atom displacements to DFT", ""]
        if key == "traces":
            lines += ["### Relaxation energy traces", "",
                      "Energy relative to the starting structure vs optimizer step, for the first structures.", ""]
        lines += [f"![{alt}]({plots[key].name})", ""]
    return lines


def _retention_section(run: RunInfo) -> list[str]:
    lines = ["## Retention: what the pretrained model did well", ""]
    kept = (run.summary or {}).get("retention")
    if not kept:
        return lines + ["Not available: summary.json has no `retention` (run with --no-retention, or not finished).",
                        ""]
    counts = kept["counts"]
    lines += [f"best.pt against the pretrained model on the bulk crystals of {', '.join(kept['species'])} "
              f"({kept['n_crystals']} DFT-relaxed crystals) and on DFT frames the run did not train on "
              f"(summary.json `retention`): {counts['better']} better, {counts['same']} same, "
              f"{counts['worse']} worse, **{'kept' if kept['kept'] else 'not kept'}**. Lattice constants and "
              "volume errors in %, bulk moduli in GPa, force RMSE in eV/Å, stress RMSE in GPa.", ""]
    if kept.get("trained_on_groups"):
        lines += [f"The run fitted DFT frames of the crystals of {', '.join(kept['trained_on_groups'])} (`--replay`): "
                  "their items are not held out.", ""]
    rows = []
    for item in kept["items"]:
        scale = 100.0 if ("lattice" in item["item"] or "volume" in item["item"]) else 1.0
        change = item["change_vs_pretrained"]
        rows.append([item["item"], format_value(item["pretrained"] * scale), format_value(item["finetuned"] * scale),
                     _percent(change, 2) if change is not None else "n/a", item["verdict"]])
    return lines + _table(["item", "pretrained", "fine-tuned", "change", "verdict"], rows) + [""]


def _movement_section(run: RunInfo, plots: dict[str, Path | None]) -> list[str]:
    lines = ["## Parameter movement per group", ""]
    if not movement_items(run.summary):
        return lines + ["Not available: summary.json has no `parameter_movement` (run not finished).", ""]
    lines += ["Relative change ||θ − θ₀|| / ||θ₀|| of each parameter group between the pretrained and the "
              "final state (summary.json `parameter_movement`): which part of the system training changed.", ""]
    if plots.get("movement"):
        lines += [f"![parameter movement per group]({plots['movement'].name})", ""]
    moved = (run.summary or {}).get("parameter_movement") or {}
    rows = [[g, moved[g].get("n"), moved[g].get("initial_norm"), moved[g].get("absolute"), moved[g].get("relative")]
            for g in ("model", "relax") if isinstance(moved.get(g), dict)]
    return lines + _table(["group", "parameters", "||θ₀||", "||θ − θ₀||", "relative"], rows) + [""]


def _settings_section(run: RunInfo) -> list[str]:
    lines = ["## Settings", ""]
    if not run.config:
        return lines + ["Not available: neither summary.json nor a checkpoint records the settings.", ""]
    lines += _table(["setting", "value"], [[f"`{k}`", v] for k, v in run.config.items()]) + [""]
    parameters = (run.summary or {}).get("parameters")
    if parameters:
        lines += [f"Trainable parameters: {parameters.get('trainable')}, frozen: {parameters.get('frozen')}.", ""]
    return lines


def build_markdown(run: RunInfo, cmp: dict | None, plots: dict[str, Path | None], data_note: str) -> str:
    """The report's markdown; ``plots`` (PNG paths, None where there was nothing to plot) are linked by name,
    ``data_note`` says where the held-out structures came from, or why there are none."""
    lines = (_header(run) + _summary_section(run) + _curves_section(run, plots)
             + _held_out_section(cmp, plots, data_note) + _retention_section(run) + _movement_section(run, plots)
             + _settings_section(run))
    lines += ["---", "", f"Generated by `relaxtune report {run.run_dir}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- HTML
def markdown_to_html(md: str, image_dir: Path | None = None, title: str = "relaxtune report") -> str:
    """A standalone HTML page of ``md``; images found in ``image_dir`` are embedded as PNG data URIs."""
    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = parser.parse(md)
    for token in tokens:
        for child in token.children or []:
            source = child.attrGet("src") if child.type == "image" else None
            path = image_dir / str(source) if image_dir is not None and source else None
            if path is not None and path.is_file():
                child.attrSet("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
    body = parser.renderer.render(tokens, parser.options, {})
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")
