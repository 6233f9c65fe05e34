"""relaxtune.report.run: reading a run directory; missing pieces are noted in the report, not fatal."""

from __future__ import annotations

import shutil

import pytest

from relaxtune.report import ReportError, load_run, write_report


def test_bad_run_dirs(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        load_run(tmp_path / "f.txt")
    with pytest.raises(ReportError, match="holds none of"):
        load_run(tmp_path)
    (tmp_path / "best.pt").write_text("not a checkpoint")
    run = load_run(tmp_path)
    assert run.model_path is None and any("unreadable" in n for n in run.notes)


def test_missing_pieces_are_reported_not_fatal(run_dir, tmp_path):
    run, data, _ = run_dir
    only_metrics = tmp_path / "only_metrics"
    only_metrics.mkdir()
    shutil.copy(run / "metrics.csv", only_metrics)
    res = write_report(only_metrics, data=str(data))
    md = res.markdown.read_text()
    assert "summary.json is missing" in md and "neither best.pt nor last.pt exists" in md
    assert "base model is unknown" in md and set(res.plots) == {"curves"}

    no_summary = tmp_path / "killed"
    no_summary.mkdir()
    shutil.copy(run / "last.pt", no_summary)
    res = write_report(no_summary, tmp_path / "out2")  # no --data, no summary: nothing to compare on
    md = res.markdown.read_text()
    assert "fine-tuned model compared: `last.pt`" in md and "pass `--data DATA`" in md
    assert "Not available: summary.json has no `parameter_movement`" in md
    assert "| `model` | sw |" in md  # settings from the checkpoint

    empty_split = write_report(run, tmp_path / "out3", data=str(data), split="val")
    assert "has no structures in split `val`" in empty_split.markdown.read_text()
