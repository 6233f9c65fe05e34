"""A report for one fine-tuning run: markdown + self-contained HTML with matplotlib PNG plots.

Reads what the trainer left in a run directory (``.run``; see ``relaxtune.train.finetune``) and adds what
the trainer does not record: the pretrained and the fine-tuned model (``best.pt``, else ``last.pt``) each
evaluated on a data split (the test split by default) by ``relaxtune.evaluate.evaluate`` with the run's own
validation settings, cached in ``OUT/report_data.json`` (``.compare``); then plots (``.plots``) and the
markdown and HTML (``.render``).

Any piece may be missing (a run killed before its first checkpoint, no summary, no test data): its section
then says what is missing and how to get it; only a path that is not a run directory at all is an error
(``ReportError``, one line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from relaxtune.report.compare import REPORT_DATA, compare_models, held_out_pairs, select_split
from relaxtune.report.plots import (plot_curves, plot_displacements, plot_dq_bars, plot_dq_scatter, plot_movement,
                                    plot_traces)
from relaxtune.report.render import build_markdown, format_value, markdown_to_html
from relaxtune.report.run import RUN_FILES, ReportError, RunInfo, infer_data_spec, load_run, read_metrics

__all__ = ["REPORT_DATA", "RUN_FILES", "ReportError", "ReportResult", "RunInfo", "build_markdown", "compare_models",
           "format_value", "held_out_pairs", "infer_data_spec", "load_run", "markdown_to_html", "read_metrics",
           "select_split", "write_report"]


@dataclass
class ReportResult:
    """Where the report went, and the comparison it shows (None when there was none)."""

    markdown: Path
    html: Path
    plots: dict[str, Path]
    comparison: dict | None


def write_report(run_dir: str | Path, out: str | Path | None = None, *, data: str | None = None,
                 split: str = "test", fmax: float | None = None, max_steps: int | None = None,
                 start: str | None = None, max_structures: int | None = None, traces: int = 3,
                 batch_size: int = 4, progress: Callable[[str], None] | None = None) -> ReportResult:
    """Write ``report.md``, ``report.html`` and the PNG plots for the run in ``run_dir`` into ``out``
    (default: ``run_dir/report``). ``data``: dataset spec for the held-out comparison (default: the one the
    run recorded, or the builtin dataset holding its training structures); ``split``: which split of it.
    ``fmax``/``max_steps``/``start`` override the run's validation settings (``eval_fmax``, ``eval_max_steps``,
    ``val_start``); ``max_structures`` caps the comparison.
    """
    run = load_run(run_dir)
    out_dir = Path(out).expanduser() if out is not None else run.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    plots: dict[str, Path | None] = {}
    plots["curves"] = (plot_curves(run.metrics, cfg.get("objective", "structure"), out_dir / "curves.png",
                                   cfg.get("val_start", "initial")) if run.metrics else None)

    cmp = None
    pairs, spec, data_note = held_out_pairs(run, data, split, max_structures)
    if pairs:
        try:
            cmp = compare_models(run, pairs, fmax=float(fmax if fmax is not None else cfg.get("eval_fmax", 0.02)),
                                 optimizer=str(cfg.get("eval_optimizer", "fire")),
                                 max_steps=int(max_steps if max_steps is not None else cfg.get("eval_max_steps", 500)),
                                 start=str(start or cfg.get("val_start", "initial")), batch_size=batch_size,
                                 cache=out_dir / REPORT_DATA, progress=progress)
        except Exception as exc:  # a model that cannot load or relax these structures: say so, keep going
            data_note = f"relaxing `{spec}` failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
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
