"""``relaxtune report RUN_DIR``: markdown + HTML report with plots for one fine-tuning run.

    relaxtune report runs/chgnet-si --out runs/chgnet-si/report --data builtin:si-defects-mini --split test
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from relaxtune.report import ReportError, write_report
from relaxtune.cli.common import CONVENTION, THREADS_HELP, UserInputError, app, use_threads


@app.command("report", epilog=CONVENTION)
def report(
    run_dir: Path = typer.Argument(..., help="A fine-tuning run directory (summary.json, metrics.csv, best.pt, last.pt)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for report.md, report.html and the PNGs "
                                       "(default: RUN_DIR/report)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset for the pretrained vs fine-tuned comparison "
                                       "(file, directory or builtin:NAME; default: the run's own dataset)."),
    split: str = typer.Option("test", "--split", help="Which split of DATA to compare on."),
    fmax: Optional[float] = typer.Option(None, "--fmax", help="Relaxation fmax, eV/Å (default: the run's eval_fmax)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Relaxation step cap (default: the run's)."),
    max_structures: Optional[int] = typer.Option(None, "--max-structures", help="Compare on at most this many."),
    traces: int = typer.Option(3, "--traces", help="How many structures get an energy-trace panel."),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
) -> None:
    """Write a markdown and a self-contained HTML report (with PNG plots) for one fine-tuning run."""
    use_threads(threads)
    try:
        result = write_report(run_dir, out, data=data, split=split, fmax=fmax, max_steps=max_steps,
                              max_structures=max_structures, traces=traces,
                              progress=lambda msg: typer.echo(msg, err=True))
    except ReportError as exc:
        raise UserInputError(str(exc)) from None
    typer.echo(f"wrote {result.markdown} and {result.html} ({len(result.plots)} plots)")
