"""relaxtune.report.compare: the report's relaxations are relaxtune.evaluate's (the trainer's validation, the
cell free where the reference relaxed it), and they are cached."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from ase.io import write

from swdata import make_cell_relaxation

from relaxtune.data import load_pairs
from relaxtune.evaluate import evaluate
from relaxtune.potentials import load_checkpoint_model, load_model
from relaxtune.report import compare, write_report


def test_report_relaxations_match_the_trainers_validation(report):
    """The held-out pair is also the validation pair, relaxed with the same settings: the report's
    pretrained and best.pt Dq must equal the trainer's epoch-0 and best-epoch validation Dq."""
    result, summary = report
    cmp = result.comparison
    assert [r["name"] for r in cmp["before"]] == ["si2_relax"]
    assert cmp["before"][0]["dq"] == pytest.approx(summary["val_before"]["dq_mean"], rel=1e-6)
    assert cmp["after"][0]["dq"] == pytest.approx(summary["val_after"]["dq_mean"], rel=1e-6)
    row = cmp["before"][0]
    assert len(row["displacements"]) == 2 and max(row["displacements"]) == pytest.approx(row["max_disp"])
    trace = row["energy_trace"]
    assert len(trace) == row["steps"] + 1 and trace[-1] < trace[0]  # a relaxation lowers the energy


def test_cell_free_pair_gives_what_evaluate_gives(run_dir, tmp_path):
    """A pair whose reference relaxed the cell: the report's Dq before and after fine-tuning are evaluate()'s
    for the same models and settings (cell free), not those of a relaxation at the initial cell."""
    run, _, summary = run_dir
    pair, frames = make_cell_relaxation(vacancy=True)
    data = tmp_path / "cells"
    data.mkdir()
    frames[0].info.update(name=pair.name, group=pair.group, relax_cell=True)
    write(data / f"{pair.name}.extxyz", frames, format="extxyz")
    (data / "splits.json").write_text(json.dumps({"test": [pair.group]}))
    pairs = load_pairs(data)
    assert [p.relax_cell for p in pairs] == [True]

    cmp = write_report(run, tmp_path / "out", data=str(data), split="test").comparison
    config = summary["config"]
    settings = dict(fmax=config["eval_fmax"], optimizer=config["eval_optimizer"],
                    max_steps=config["eval_max_steps"], start=config["val_start"])
    pretrained = load_model("sw", dtype=torch.float64)
    before = evaluate(pretrained, pairs, **settings).rows[0]
    after = evaluate(load_checkpoint_model(run / "best.pt"), pairs, **settings).rows[0]
    assert cmp["before"][0]["dq"] == pytest.approx(before["dq"], rel=1e-9)
    assert cmp["after"][0]["dq"] == pytest.approx(after["dq"], rel=1e-9)
    assert cmp["before"][0]["volume_error"] == pytest.approx(before["volume_error"], rel=1e-9)
    # the fixed-cell relaxation the report used to do lands far from this
    fixed = evaluate(pretrained, [dataclasses.replace(pairs[0], relax_cell=False)], **settings).rows[0]
    assert fixed["dq"] > 5 * before["dq"]


def test_report_reuses_cached_relaxations(run_dir, report, monkeypatch, tmp_path):
    result, _ = report
    out = tmp_path / "report"
    shutil.copytree(result.markdown.parent, out)  # the shared report stays as it is for the other tests

    def boom(*a, **k):
        raise AssertionError("relaxed again although the cache matches")

    monkeypatch.setattr(compare, "evaluate", boom)
    run, data, _ = run_dir
    again = write_report(run, out, data=str(data), split="test")
    assert again.comparison["before"] == result.comparison["before"]
    # a different setting is a different key: relaxes again (here: fails, which the report states)
    other = write_report(run, out, data=str(data), split="test", fmax=0.01)
    assert other.comparison is None
    assert "relaxing" in other.markdown.read_text() and "AssertionError: relaxed again" in other.markdown.read_text()
